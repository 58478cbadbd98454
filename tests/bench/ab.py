"""Bench: this checkout against another (an earlier commit's worktree), interleaved, same sitting.

    git worktree add /tmp/before <commit> && .venv/bin/python tests/bench/ab.py /tmp/before [--server granian]

The VM's speed drifts by more than most changes move a figure, so two full bench runs at
different times do not compare. Here both trees serve side by side (2 workers each) and
the rounds alternate: throughput on 10 and on 100,000 rules, keep-alive and with a new
connection per request (as iPXE does), then boot storms.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402
from generate import mac_for, rules_text  # noqa: E402


def start(root: Path, rules: Path, port: int, work: Path, server: str) -> run.Server:
    log = work / f"{port}.log"
    # A state file of its own: both trees' servers read rules from one folder, and would
    # otherwise record the machines they see into one file, each waiting for the other's writes.
    process = subprocess.Popen([run.PYTHON, str(root / "app.py"), "serve", "--rules", str(rules), "--port", str(port),
                                "--workers", "2", "--server", server, "--state", str(work / f"state-{port}.db")],
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=root)
    run.wait_http(f"http://127.0.0.1:{port}/healthz")
    return run.Server("bootrules", process, port, log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path, help="the other checkout (its app.py is served)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--server", choices=("waitress", "granian"), default="waitress")
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": HERE.parent.parent}
    work = Path(tempfile.mkdtemp(prefix="bootrules-ab-"))
    servers: dict[str, run.Server] = {}
    try:
        (work / "r10.yaml").write_text(rules_text(10))
        (work / "r100k.yaml").write_text(rules_text(100000))
        for offset, (name, root) in enumerate(trees.items()):
            servers[f"{name} 10"] = start(root, work / "r10.yaml", 18400 + 10 * offset, work, args.server)
            servers[f"{name} 100k"] = start(root, work / "r100k.yaml", 18401 + 10 * offset, work, args.server)
        time.sleep(1)
        for name in trees:
            big = servers[f"{name} 100k"]
            print(f"{name:<7} load 100k rules {run.load_seconds(big.log, 100000):.2f} s, "
                  f"PSS of every process {run.pss_mb(big.pids()):.0f} MB")
        modes = {"keep-alive": 32, "new connection": 64}  # wrk's connections, as servers.py
        rates: dict[tuple[str, str], list[float]] = {(key, mode): [] for mode in modes for key in servers}
        for _ in range(args.rounds):
            for mode, connections in modes.items():
                for key, server in servers.items():
                    mac = mac_for(3) if key.endswith(" 10") else mac_for(94999)
                    rates[(key, mode)].append(run.wrk(server.url + run.decision_path(mac), 4, connections,
                                                      new_connections=mode == "new connection"))
        print(f"{args.server}, wrk -t2, 4 s rounds")
        for (key, mode), values in rates.items():
            print(f"{key:<12} {mode} req/s, median {statistics.median(values):,.0f} "
                  f"({', '.join(f'{value:,.0f}' for value in values)})")
        storms: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for round_number in range(args.rounds):
            for index, name in enumerate(trees):
                first = 10000 * (2 * round_number + index)
                storms[name].append(run.storm(servers[f"{name} 100k"].url, "/boot.ipxe", "/ipxe", 10000, first=first))
        for name, found in storms.items():
            merged = run.median_storm(found)
            print(f"{name:<7} storm 10,000 machines, 100k rules: errors {merged['non200'] + merged['socket_errors']:.0f}, "
                  f"p99 median {merged['p99_us'] / 1000:.1f} ms "
                  f"({', '.join(f'{p / 1000:.1f}' for p in merged['p99_each'])})")
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
