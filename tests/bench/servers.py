"""Bench: bootrules under waitress and under granian, beside the PHP switch and nginx's ceiling. Prints figures; about 25 minutes.

    .venv/bin/python tests/bench/servers.py [--rounds 5] [--flat-cycles 30] [--flat-only] [--quick]

The same box, one sitting, interleaved rounds (the median of each): wrk -t2 against
/ipxe with 10 rules, /ipxe's last rule of 100,000 and /boot.ipxe (PHP: a 10-case switch;
the ceiling: nginx serving scripts of the same size from files; and each server under
bootrules' serving answering those two scripts without deciding, tests/bench/fixed_answer.py),
keep-alive at -c32 and a new connection per request at -c64 (what iPXE does); the
10,000-machine boot storm on 100,000 rules (PHP: its 10,000-case switch; nginx and the
fixed answers: the two scripts); 100,000 rules' last-rule and no-match rows (a BIOS and a
UEFI machine) against 10 rules, with a second 10-rule server as the control; and the PSS
of each bootrules (every process together, 100,000 rules) through a reload, sampled every
50 ms, fresh and again after the storms. Timings here are figures to read, never
pass/fail tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from generate import mac_for, rules_text  # noqa: E402
from run import (FLAT_CASES, PYTHON, ROOT, Server, decision_path, flatness, median_storm,  # noqa: E402
                 pss_through_reload, start_bootrules, start_nginx_static, start_php, storm, wait_http, wrk)

SERVERS = ("waitress", "granian")
FIXED = {name: f"{name}-fixed" for name in SERVERS}  # the same server answering without deciding
WORKERS = os.cpu_count() or 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-docs", action="store_true", help="do not write the figures into docs/performance.md")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--flat-cycles", type=int, default=30, help="1 s rounds of each 100k-rule case")
    parser.add_argument("--flat-only", action="store_true", help="only the 100,000-rule rows (about 9 minutes)")
    parser.add_argument("--quick", action="store_true", help="one round of each (figures are rougher)")
    args = parser.parse_args()
    rounds, storm_rounds, seconds = (1, 1, 3) if args.quick else (args.rounds, 5, 4)
    flat_cycles = 3 if args.quick else args.flat_cycles
    work = Path(tempfile.mkdtemp(prefix="bootrules-servers-bench-"))
    os.chmod(work, 0o755)
    servers = []
    rates: dict[tuple[str, str], list[float]] = {}
    storm_figures: dict[str, dict[str, float]] = {}
    fresh: dict[str, tuple[float, float, float]] = {}
    memory: dict[str, tuple[float, float, float]] = {}
    try:
        (work / "rules-10.yaml").write_text(rules_text(10))
        php = None if args.flat_only else start_php(work, 18290)
        servers.append(php)
        small, big, control = {}, {}, {}

        def options(name: str, port: int) -> tuple[str, ...]:  # each server a state file of its own
            return ("--server", name, "--state", str(work / f"state-{port}.db"))

        for number, name in enumerate(SERVERS):
            small[name] = start_bootrules(work / "rules-10.yaml", 18291 + number, work, WORKERS, options(name, 18291 + number))
            servers.append(small[name])
            control[name] = start_bootrules(work / "rules-10.yaml", 18293 + number, work, WORKERS,
                                            options(name, 18293 + number))
            servers.append(control[name])
            (work / f"rules-100k-{name}.yaml").write_text(rules_text(100000))
            big[name] = start_bootrules(work / f"rules-100k-{name}.yaml", 18295 + number, work, WORKERS,
                                        options(name, 18295 + number))
            servers.append(big[name])
        hit = decision_path(mac_for(3))
        nginx = None
        if php is not None:
            # The ceiling: nginx answering the same two scripts from files, as many workers.
            scripts = {"/ipxe": _body(small["granian"].url + hit), "/boot.ipxe": _body(small["granian"].url + "/boot.ipxe")}
            nginx = start_nginx_static(work, 18297, scripts, WORKERS)
            servers.append(nginx)
            fixed = {}
            for number, name in enumerate(SERVERS):
                fixed[name] = _start_fixed(work / "static", work / "rules-10.yaml", 18288 + number, work, name)
                servers.append(fixed[name])
            # Memory first, on servers that have answered nothing yet; again after the storms below.
            fresh = {name: pss_through_reload(big[name], work / f"rules-100k-{name}.yaml", "loaded 100000 rules")
                     for name in SERVERS}
            php_hit = f"{php.url}/ipxe10.php?mac={mac_for(3).replace(':', '-')}"
            urls = {("php", "ipxe"): php_hit, ("nginx", "ipxe"): nginx.url + hit,
                    ("nginx", "entry"): nginx.url + "/boot.ipxe"}
            for name in SERVERS:
                urls[(name, "ipxe")] = small[name].url + hit
                urls[(name, "ipxe-100k")] = big[name].url + FLAT_CASES["last"]
                urls[(name, "entry")] = small[name].url + "/boot.ipxe"
                urls[(FIXED[name], "ipxe")] = fixed[name].url + hit
            for _ in range(rounds):
                for mode in ("keep-alive", "new-connection"):
                    for key, url in urls.items():
                        rate = wrk(url, seconds, 64 if mode == "new-connection" else 32,
                                   new_connections=mode == "new-connection")
                        rates.setdefault((*key, mode), []).append(rate)

        # 100,000 rules against 10, each 100k figure between two 10-rule ones; and a second
        # 10-rule server the same way, whose ratio shows how far the bench itself strays
        # from 1. The first rule is left to run.py: the index takes it as it takes the last.
        flat: dict[str, dict[str, list[float]]] = {}
        flat_bases: dict[str, list[float]] = {}
        for name in SERVERS:
            cases = {case: big[name].url + path for case, path in FLAT_CASES.items() if case != "first"}
            cases["10 rules, a second server"] = control[name].url + hit
            flat[name], flat_bases[name] = flatness(small[name].url + hit, cases, flat_cycles)

        if php is not None:
            storms: dict[str, list[dict[str, float]]] = {
                name: [] for name in (*SERVERS, *FIXED.values(), "php", "nginx")}
            for number in range(storm_rounds):
                for name in SERVERS:
                    storms[name].append(storm(big[name].url, "/boot.ipxe", "/ipxe", 10000, first=10000 * number))
                    storms[FIXED[name]].append(storm(fixed[name].url, "/boot.ipxe", "/ipxe", 10000))
                storms["php"].append(storm(php.url, "/boot.php", "/ipxe.php", 10000))
                storms["nginx"].append(storm(nginx.url, "/boot.ipxe", "/ipxe", 10000))
            storm_figures = {name: median_storm(runs) for name, runs in storms.items()}
            memory = {name: pss_through_reload(big[name], work / f"rules-100k-{name}.yaml", "loaded 100000 rules")
                      for name in SERVERS}
    finally:
        for server in servers:
            if server is not None:
                server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n100,000 rules against 10: keep-alive req/s as a share of the 10-rule server's, median of "
          f"{flat_cycles} 1 s rounds each between two 1 s rounds on 10 rules (target >= 0.95 for granian)")
    for name in SERVERS:
        print(f"  {name:<9} 10 rules {statistics.median(flat_bases[name]):,.0f} req/s; " + "; ".join(
            f"{case} {statistics.median(values):.3f} (middle half {_quartiles(values)})"
            for case, values in flat[name].items()))
    if php is None:
        return
    median = {key: statistics.median(values) for key, values in rates.items()}
    print(f"\nrequests a second, wrk -t2, {seconds} s, median of {rounds} interleaved rounds; {WORKERS} workers "
          f"for bootrules and nginx; in brackets, the share of nginx serving the same script from a file")
    print(f"  {'server and request':<44} {'keep-alive -c32':>22} {'new connection -c64':>24}")
    cases = {"ipxe": "/ipxe, 10 rules", "ipxe-100k": "/ipxe, 100,000 rules (the last)", "entry": "/boot.ipxe"}
    rows = [("nginx", "ipxe", "nginx, a static file of /ipxe's size"), ("nginx", "entry", "nginx, /boot.ipxe's file"),
            ("php", "ipxe", "PHP switch (apache2), 10 cases")]
    rows += [(name, case, f"bootrules {name}, {label}") for name in SERVERS for case, label in cases.items()]
    rows += [(FIXED[name], "ipxe", f"{name}, a fixed answer (no decision)") for name in SERVERS]
    for name, case, label in rows:
        figures = []
        for mode in ("keep-alive", "new-connection"):
            rate = median[(name, case, mode)]
            ceiling = median[("nginx", "entry" if case == "entry" else "ipxe", mode)]
            figures.append(f"{rate:,.0f} ({rate / ceiling:.2f})")
        print(f"  {label:<44} {figures[0]:>22} {figures[1]:>24}")
    for name in SERVERS:
        print(f"  {name} / PHP: keep-alive {median[(name, 'ipxe', 'keep-alive')] / median[('php', 'ipxe', 'keep-alive')]:.2f}, "
              f"new connection {median[(name, 'ipxe', 'new-connection')] / median[('php', 'ipxe', 'new-connection')]:.2f}")
    print(f"\nstorm: 10,000 new machines x 2 requests, 256 at a time, new connection each; median of {storm_rounds}")
    for name in ("nginx", *SERVERS, *FIXED.values(), "php"):
        run = storm_figures[name]
        label = {"php": "PHP (10,000 cases)", "nginx": "nginx (static files)",
                 **{fixed: f"{name}, fixed answers" for name, fixed in FIXED.items()}}.get(
            name, f"bootrules {name} (100k rules)")
        ratio = "" if name == "nginx" else f" ({run['p99_us'] / storm_figures['nginx']['p99_us']:.2f} of nginx's)"
        print(f"  {label:<30} errors {run['non200'] + run['socket_errors']:.0f}, p50 {run['p50_us'] / 1000:.1f} ms, "
              f"p99 {run['p99_us'] / 1000:.1f} ms{ratio}, max {run['max_us'] / 1000:.0f} ms, "
              f"total {run['elapsed_us'] / 1e6:.2f} s")
    print(f"\nPSS, every process (parent, leader, {WORKERS} workers), 100,000 rules, sampled every 50 ms "
          "through a reload (target < 300 MB)")
    for when, figures in (("fresh", fresh), ("after the storms", memory)):
        for name in SERVERS:
            at_rest, most, after = figures[name]
            print(f"  {name:<9} {when:<17} {at_rest:.0f} MB at rest, {most:.0f} MB at most through a reload, "
                  f"{after:.0f} MB after it")


def _start_fixed(scripts: Path, rules: Path, port: int, work: Path, server: str) -> Server:
    """bootrules' serving under `server`, its workers answering the scripts in `scripts`
    without deciding (tests/bench/fixed_answer.py)."""
    log = work / f"fixed-{port}.log"
    process = subprocess.Popen([PYTHON, str(HERE / "fixed_answer.py"), str(scripts), "serve", "--rules", str(rules),
                                "--port", str(port), "--workers", str(WORKERS), "--server", server],
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return Server("bootrules", process, port, log)


def _body(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def _quartiles(values: list[float]) -> str:
    low, _, high = statistics.quantiles(values, n=4)
    return f"{low:.2f}-{high:.2f}"


if __name__ == "__main__":
    import perfdoc

    with perfdoc.recorded("servers.py", write=not {"--quick", "--no-docs", "--flat-only"} & set(sys.argv)):
        main()
