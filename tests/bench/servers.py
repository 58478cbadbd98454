"""Bench: bootrules under waitress and under granian, beside the PHP switch. Prints figures; about 8 minutes.

    .venv/bin/python tests/bench/servers.py [--rounds 5] [--quick]

The same box, one sitting, interleaved rounds (the median of each): wrk -t2 against
/ipxe with 10 rules (PHP: a 10-case switch), keep-alive at -c32 and a new connection per
request at -c64 (what iPXE does); the 10,000-machine boot storm on 100,000 rules (PHP: its
10,000-case switch); 100,000 rules' first, last and no-match rows against 10 rules; and the
PSS of each bootrules (every process together, 100,000 rules) through a reload, sampled
every 50 ms, fresh and again after the storms. Timings here are figures to read, never pass/fail tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import mac_for, rules_text  # noqa: E402
from run import decision_path, median_storm, pss_through_reload, start_bootrules, start_php, storm, wrk  # noqa: E402

SERVERS = ("waitress", "granian")
WORKERS = os.cpu_count() or 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one round of each (figures are rougher)")
    args = parser.parse_args()
    rounds, storm_rounds, seconds = (1, 1, 3) if args.quick else (args.rounds, 3, 4)
    work = Path(tempfile.mkdtemp(prefix="bootrules-servers-bench-"))
    os.chmod(work, 0o755)
    servers = []
    try:
        (work / "rules-10.yaml").write_text(rules_text(10))
        php = start_php(work, 18290)
        servers.append(php)
        small, big = {}, {}
        for number, name in enumerate(SERVERS):
            extra = ("--server", name)
            small[name] = start_bootrules(work / "rules-10.yaml", 18291 + number, work, WORKERS, extra)
            servers.append(small[name])
            (work / f"rules-100k-{name}.yaml").write_text(rules_text(100000))
            big[name] = start_bootrules(work / f"rules-100k-{name}.yaml", 18295 + number, work, WORKERS, extra)
            servers.append(big[name])
        # Memory first, on servers that have answered nothing yet; again after the storms below.
        fresh = {name: pss_through_reload(big[name], work / f"rules-100k-{name}.yaml", "loaded 100000 rules")
                 for name in SERVERS}

        hit = decision_path(mac_for(3))
        php_hit = f"{php.url}/ipxe10.php?mac={mac_for(3).replace(':', '-')}"
        cases = {"php": php_hit, **{name: small[name].url + hit for name in SERVERS}}
        rates: dict[tuple[str, str], list[float]] = {}
        for _ in range(rounds):
            for mode in ("keep-alive", "new-connection"):
                for name, url in cases.items():
                    rate = wrk(url, seconds, 64 if mode == "new-connection" else 32, new_connections=mode == "new-connection")
                    rates.setdefault((name, mode), []).append(rate)
        flat_urls = {"first": decision_path(mac_for(0)), "last": decision_path(mac_for(94999)),
                     "none": decision_path("0e:00:00:00:00:01")}
        # Each 100k-rule figure is taken right after a 10-rule one and divided by it: the
        # VM's drift moves both alike, and the ratio's median is steadier than a ratio of medians.
        flat: dict[tuple[str, str], list[float]] = {}
        for _ in range(rounds):
            for name in SERVERS:
                for case, path in flat_urls.items():
                    base = wrk(small[name].url + hit, seconds)
                    value = wrk(big[name].url + path, seconds)
                    flat.setdefault((name, "10 rules"), []).append(base)
                    flat.setdefault((name, case), []).append(value)
                    flat.setdefault((name, case + " ratio"), []).append(value / base)

        storms: dict[str, list[dict[str, float]]] = {name: [] for name in (*SERVERS, "php")}
        for number in range(storm_rounds):
            for name in SERVERS:
                storms[name].append(storm(big[name].url, "/boot.ipxe", "/ipxe", 10000, first=10000 * number))
            storms["php"].append(storm(php.url, "/boot.php", "/ipxe.php", 10000))
        storm_figures = {name: median_storm(runs) for name, runs in storms.items()}

        memory = {name: pss_through_reload(big[name], work / f"rules-100k-{name}.yaml", "loaded 100000 rules")
                  for name in SERVERS}
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    median = {key: statistics.median(values) for key, values in rates.items()}
    flat_median = {key: statistics.median(values) for key, values in flat.items()}
    print(f"\nrequests a second, wrk -t2, {seconds} s, median of {rounds} interleaved rounds; {WORKERS} workers "
          f"for bootrules; 10 rules (PHP: a 10-case switch)")
    print(f"  {'server':<22} {'keep-alive -c32':>16} {'new connection -c64':>20}")
    for name in ("php", *SERVERS):
        label = "PHP switch (apache2)" if name == "php" else f"bootrules, {name}"
        print(f"  {label:<22} {median[(name, 'keep-alive')]:>16,.0f} {median[(name, 'new-connection')]:>20,.0f}")
    for name in SERVERS:
        print(f"  {name} / PHP: keep-alive {median[(name, 'keep-alive')] / median[('php', 'keep-alive')]:.2f}, "
              f"new connection {median[(name, 'new-connection')] / median[('php', 'new-connection')]:.2f}")
    print("\n100,000 rules against 10 (keep-alive req/s, median; in brackets the median of the ratios of "
          "back-to-back pairs; target >= 0.95 for granian)")
    for name in SERVERS:
        base = flat_median[(name, "10 rules")]
        print(f"  {name:<9} 10 rules {base:,.0f}; " + ", ".join(
            f"{case} {flat_median[(name, case)]:,.0f} ({flat_median[(name, case + ' ratio')]:.2f})"
            for case in flat_urls))
    print(f"\nstorm: 10,000 new machines x 2 requests, 256 at a time, new connection each; median of {storm_rounds}")
    for name in (*SERVERS, "php"):
        run = storm_figures[name]
        label = "PHP (10,000 cases)" if name == "php" else f"bootrules {name} (100k rules)"
        print(f"  {label:<30} errors {run['non200'] + run['socket_errors']:.0f}, p50 {run['p50_us'] / 1000:.1f} ms, "
              f"p99 {run['p99_us'] / 1000:.1f} ms, max {run['max_us'] / 1000:.0f} ms, total {run['elapsed_us'] / 1e6:.2f} s")
    print(f"\nPSS, every process (parent, leader, {WORKERS} workers), 100,000 rules, sampled every 50 ms "
          "through a reload (target < 300 MB)")
    for when, figures in (("fresh", fresh), ("after the storms", memory)):
        for name in SERVERS:
            at_rest, most, after = figures[name]
            print(f"  {name:<9} {when:<17} {at_rest:.0f} MB at rest, {most:.0f} MB at most through a reload, "
                  f"{after:.0f} MB after it")


if __name__ == "__main__":
    main()
