"""Bench: recording the machines seen, and the status page at 100,000 machines. Prints figures;
about two minutes.

    .venv/bin/python tests/bench/machines.py [--rounds 5] [--workers 2]

1. The 10,000-machine storm (new machines, entry script then decision, new connection each,
   256 at a time) against two servers on the bundled rules.yaml: recording on (the default)
   and recording off (--machines-keep 0), rounds alternating. Then every machine each round
   booted is looked for in the state store.
2. A state store filled with 100,000 machines (written with the recorder's own SQL), served
   by bootrules; each page and API call timed over several requests.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

from run import PYTHON, ROOT, Server, median_storm, storm, wait_http  # noqa: E402

from bootrules.state import MachineStore  # noqa: E402
from bootrules.state.database import open_database  # noqa: E402
from bootrules.state.machine_store import PAGE_SIZE, Sighting  # noqa: E402


def start(rules: Path, port: int, work: Path, workers: int, *extra: str) -> Server:
    import subprocess

    log = work / f"bootrules-{port}.log"
    command = [PYTHON, str(ROOT / "app.py"), "serve", "--rules", str(rules), "--port", str(port),
               "--workers", str(workers), *extra]
    process = subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return Server("bootrules", process, port, log)


def recorded_storm_machines(state: Path, rounds: int) -> tuple[int, int]:
    """(storm machines found in the store, storm machines expected): every index of every round."""
    with sqlite3.connect(state) as db:
        found = {int(mac.replace(":", "")[6:], 16) for (mac,) in db.execute("SELECT mac FROM bootrules_machines")
                 if mac and mac.startswith("02:00:00:")}
    db.close()
    expected = set(range(10000 * rounds))
    return len(found & expected), len(expected)


def fill(state: Path, count: int) -> None:
    """`count` machines, as the recorder writes them; one in ten unknown, in 8 products."""
    store = MachineStore(open_database(str(state), patient=True))
    now = time.time()
    products = ["poweredge r650", "poweredge r750", "proliant dl360", "sys-1029p-wtr", "thinksystem sr630",
                "vmware7,1", "standard pc (q35)", "optiplex 7090"]
    rng = random.Random(7)
    batch: dict[str, Sighting] = {}
    for number in range(count):
        mac = f"0a:{number >> 24 & 255:02x}:{number >> 16 & 255:02x}:{number >> 8 & 255:02x}:{number & 255:02x}:01"
        unknown = number % 10 == 0
        rule, action = ("everyone-else", "exit") if unknown else (f"rack-{number % 40:02d}", "boot")
        when = now - rng.uniform(0, 7 * 86400)
        facts = {"mac": mac, "serial": f"sn{number:08d}", "product": products[number % len(products)],
                 "manufacturer": "dell inc.", "platform": "efi", "buildarch": "x86_64"}
        seen = Sighting(facts, f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}", when, rule, action,
                        unknown)
        for _ in range(number % 5):
            seen.add(facts, seen.client, when, rule, action, unknown)
        batch[f"mac:{mac}"] = seen
        if len(batch) == 5000:
            store.write(batch, {})
            batch = {}
    if batch:
        store.write(batch, {})
    store.close()


def timed(url: str, times: int = 15) -> tuple[float, float, int]:
    """(median ms, max ms, bytes) of GET `url`, after one request to warm up."""
    urllib.request.urlopen(url, timeout=30).read()
    spent = []
    size = 0
    for _ in range(times):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as response:
            size = len(response.read())
        spent.append((time.perf_counter() - started) * 1000)
    return statistics.median(spent), max(spent), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-docs", action="store_true", help="do not write the figures into docs/performance.md")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--machines", type=int, default=100000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bootrules-machines-bench-"))
    servers: list[Server] = []
    try:
        (work / "on").mkdir()
        (work / "off").mkdir()
        for side in ("on", "off"):
            shutil.copy(ROOT / "rules.yaml", work / side / "rules.yaml")
        on = start(work / "on" / "rules.yaml", 18291, work, args.workers)
        off = start(work / "off" / "rules.yaml", 18292, work, args.workers, "--machines-keep", "0")
        servers += [on, off]
        runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
        for number in range(args.rounds):
            order = (("on", on), ("off", off)) if number % 2 == 0 else (("off", off), ("on", on))
            for name, server in order:
                runs[name].append(storm(server.url, "/boot.ipxe", "/ipxe", 10000, first=10000 * number))
        time.sleep(2.5)  # a batch is written every second
        found, expected = recorded_storm_machines(work / "on" / "bootrules-state-machines.db", args.rounds)
        metrics = urllib.request.urlopen(on.url + "/metrics").read().decode()
        dropped = next((line.split()[-1] for line in metrics.splitlines()
                        if line.startswith("bootrules_machine_records_dropped_total")), "0")
        figures = {name: median_storm(found_runs) for name, found_runs in runs.items()}
        print(f"storm: 10,000 new machines x 2 requests, 256 at a time, {args.workers} workers, bundled rules.yaml, "
              f"{args.rounds} rounds each, alternating, median")
        for name in ("on", "off"):
            run = figures[name]
            print(f"  recording {name:<3} errors {run['non200'] + run['socket_errors']:.0f}, p50 {run['p50_us'] / 1000:.1f} ms, "
                  f"p99 {run['p99_us'] / 1000:.1f} ms, max {run['max_us'] / 1000:.0f} ms, "
                  f"total {run['elapsed_us'] / 1e6:.2f} s; p99 of each round: "
                  f"{', '.join(f'{p / 1000:.1f}' for p in run['p99_each'])} ms")
        ratio = figures["on"]["p99_us"] / figures["off"]["p99_us"]
        print(f"  p99 recording on / off: {ratio:.2f} (target <= 1.2)")
        print(f"  storm machines in the store after the batches were written: {found:,} of {expected:,}; "
              f"records dropped: {dropped}")
        for server in servers:
            server.stop()
        servers.clear()

        state = work / "big" / "bootrules-state-machines.db"
        state.parent.mkdir()
        shutil.copy(ROOT / "rules.yaml", state.parent / "rules.yaml")
        started = time.perf_counter()
        fill(state, args.machines)
        print(f"status page at {args.machines:,} machines (filled in {time.perf_counter() - started:.1f} s; "
              f"{state.stat().st_size / 1e6:.0f} MB of SQLite), median / max of 15 requests:")
        big = start(state.parent / "rules.yaml", 18293, work, args.workers)
        servers.append(big)
        last_page = -(-args.machines // PAGE_SIZE)
        for label, path in (
                ("/ui/ (overview)", "/ui/"),
                ("/ui/machines (newest 50)", "/ui/machines"),
                (f"/ui/machines?page={last_page} (the oldest)", f"/ui/machines?page={last_page}"),
                ("/ui/machines?unknown=1", "/ui/machines?unknown=1"),
                ("/ui/machines?rule=rack-07", "/ui/machines?rule=rack-07"),
                ("/ui/machines?q=sn0004242 (substring)", "/ui/machines?q=sn0004242"),
                ("/ui/machines/<one machine>", "/ui/machines/mac:0a:00:00:10:92:01"),
                ("/api/machines?per_page=500", "/api/machines?per_page=500")):
            median, worst, size = timed(big.url + path)
            print(f"  {label:<44} {median:6.1f} ms / {worst:6.1f} ms  ({size / 1000:.0f} kB)"
                  f"{'' if worst < 300 else '  over 300 ms'}")
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    import perfdoc

    with perfdoc.recorded("machines.py", write=not {"--quick", "--no-docs", "--flat-only"} & set(sys.argv)):
        main()
