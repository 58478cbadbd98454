"""Bench: per-machine templates and a 100,000-row inventory, against the same rule untemplated.
Prints figures; about five minutes.

    .venv/bin/python tests/bench/inventory.py [--rounds 5]

1. Loading a rules file that names a 100,000-row CSV inventory (in process), and `check`
   on it (the command, timed whole).
2. Two servers (2 workers each): a templated `boot` rule (hostname, address and disk from
   the machine's row) on the 100,000-row inventory, and the same rule untemplated with a
   10-row inventory. wrk keep-alive on /ipxe for one machine of the inventory, rounds
   interleaved (target: templated at least 0.9 of untemplated).
3. The boot storm (10,000 new machines × 2 requests, new connection each, 256 at a time)
   against each (target: the templated p99 at most 1.2 times).
4. GET /files/<token>/preseed.cfg, a 4 KB templated preseed, against /ipxe on the same
   server (target: at least 0.8 of /ipxe's rate).
5. PSS of every process of the templated server (target: under 300 MB).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

from run import PYTHON, ROOT, median_storm, pss_mb, start_bootrules, storm, wrk  # noqa: E402

ROWS = 100_000
TEMPLATED = """inventory: inventory.csv
rules:
  - name: install
    match: {{mac: "02:00:00:*"}}
    once: {once}
    vars: {{disk: /dev/sda}}
    files: [preseed.cfg]
    boot:
      kernel: http://mirror.example.com/debian/linux
      initrd: http://mirror.example.com/debian/initrd.gz
      args: auto=true priority=critical hostname={{{{ hostname }}}} ip={{{{ ip }}}} disk={{{{ disk }}}} url={{{{ files }}}}preseed.cfg
  - name: rest
    exit: true
"""
PLAIN = """inventory: inventory.csv
rules:
  - name: install
    match: {mac: "02:00:00:*"}
    boot:
      kernel: http://mirror.example.com/debian/linux
      initrd: http://mirror.example.com/debian/initrd.gz
      args: auto=true priority=critical hostname=host-00001 ip=10.0.0.1 disk=/dev/sda url=http://pxe.example.com/preseed.cfg
  - name: rest
    exit: true
"""
PLAIN_TEMPLATED = TEMPLATED.replace("    once: {once}\n", "").replace("    files: [preseed.cfg]\n", "").replace(
    " url={{{{ files }}}}preseed.cfg", " url=http://pxe.example.com/preseed.cfg")


def mac(index: int) -> str:
    return f"02:00:00:{index >> 16 & 255:02x}:{index >> 8 & 255:02x}:{index & 255:02x}"


def inventory(rows: int) -> str:
    lines = ["mac,hostname,ip,role,disk"]
    lines += [f"{mac(n)},host-{n:06d},10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255},web,"
              f"{'/dev/nvme0n1' if n % 2 else ''}" for n in range(rows)]
    return "\n".join(lines) + "\n"


def preseed() -> str:
    """A preseed of about 4 KB with the machine's values in it."""
    lines = ["d-i netcfg/get_hostname string {{ hostname }}", "d-i netcfg/get_ipaddress string {{ ip }}",
             "d-i partman-auto/disk string {{ disk }}", "d-i preseed/late_command string wget -q -O /dev/null "
             "--post-data= {{ done }}"]
    filler = [f"d-i bootrules/example-{n:03d} string a value that fills the answers file to a realistic size"
              for n in range(44)]
    return "\n".join(lines + filler) + "\n"


def setup(folder: Path, rules: str, rows: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "inventory.csv").write_text(inventory(rows))
    (folder / "templates").mkdir()
    (folder / "templates" / "preseed.cfg").write_text(preseed())
    (folder / "rules.yaml").write_text(rules)
    return folder / "rules.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-docs", action="store_true", help="do not write the figures into docs/performance.md")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one round of each")
    args = parser.parse_args()
    rounds, seconds = (1, 2) if args.quick else (args.rounds, 4)
    work = Path(tempfile.mkdtemp(prefix="bootrules-inventory-"))
    servers = []
    try:
        big = setup(work / "big", PLAIN_TEMPLATED.format(once="v1"), ROWS)
        started = time.perf_counter()
        subprocess.run([PYTHON, "-c", f"from bootrules.rules.loader import load_rules; load_rules({str(big)!r})"],
                       cwd=ROOT, check=True)
        load_process = time.perf_counter() - started
        from bootrules.rules.loader import load_rules

        loads = []
        for _ in range(3):
            started = time.perf_counter()
            load_rules(big)
            loads.append(time.perf_counter() - started)
        started = time.perf_counter()
        checked = subprocess.run([PYTHON, str(ROOT / "app.py"), "check", str(big)], capture_output=True, text=True)
        check_seconds = time.perf_counter() - started
        warnings = re.search(r"(\d+) warnings?", checked.stdout)

        templated = start_bootrules(big, 18491, work, 2)
        plain = start_bootrules(setup(work / "plain", PLAIN, 10), 18492, work, 2)
        servers += [templated, plain]
        files_rules = setup(work / "files", TEMPLATED.format(once="v1"), ROWS)
        files = start_bootrules(files_rules, 18493, work, 2)
        servers.append(files)
        query = f"/ipxe?mac={mac(1234).replace(':', '-')}&platform=pcbios"
        for server in servers:
            urllib.request.urlopen(server.url + query, timeout=30).read()
        script = urllib.request.urlopen(files.url + query, timeout=30).read().decode()
        files_path = re.search(r"url=http://[^/]+(/files/[^ ]+)", script).group(1)
        rates: dict[str, list[float]] = {"templated": [], "plain": [], "files": [], "files /ipxe": []}
        for _ in range(rounds):
            rates["templated"].append(wrk(templated.url + query, seconds))
            rates["plain"].append(wrk(plain.url + query, seconds))
            rates["files"].append(wrk(files.url + files_path, seconds))
            rates["files /ipxe"].append(wrk(files.url + query, seconds))
        storms: dict[str, list[dict[str, float]]] = {"templated": [], "plain": []}
        for number in range(rounds):
            for name, server in (("templated", templated), ("plain", plain)):
                storms[name].append(storm(server.url, "/boot.ipxe", "/ipxe", 10000, first=(number * 10000) % ROWS))
        pss = pss_mb(templated.pids())
        median = {name: statistics.median(values) for name, values in rates.items()}
        storm_median = {name: median_storm(runs) for name, runs in storms.items()}
        size = len(urllib.request.urlopen(files.url + files_path, timeout=30).read())
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"inventory of {ROWS:,} machines (CSV), 2 workers each, wrk -t2 -c32 keep-alive, {seconds} s x {rounds} "
          "interleaved rounds, median:")
    print(f"  load the rules and the inventory, in process          {min(loads):.2f} s (best of 3; a fresh "
          f"process: {load_process:.2f} s) (target < 5 s)")
    print(f"  check, the whole command                               {check_seconds:.2f} s, "
          f"{warnings.group(1) if warnings else '?'} warnings (target < 10 s)")
    ratio = median["templated"] / median["plain"]
    print(f"  /ipxe, templated rule, {ROWS:,} rows                    {median['templated']:>9,.0f} req/s")
    print(f"  /ipxe, the same rule untemplated, 10 rows               {median['plain']:>9,.0f} req/s")
    print(f"  templated / untemplated                                {ratio:.2f} "
          f"({'met' if ratio >= 0.9 else 'MISSED'}: >= 0.9)")
    files_ratio = median["files"] / median["files /ipxe"]
    print(f"  /files/, a {size / 1000:.1f} kB templated preseed                 {median['files']:>9,.0f} req/s")
    print(f"  /ipxe on the same server                               {median['files /ipxe']:>9,.0f} req/s")
    print(f"  /files/ / /ipxe                                        {files_ratio:.2f} "
          f"({'met' if files_ratio >= 0.8 else 'MISSED'}: >= 0.8)")
    print(f"storm: 10,000 new machines x 2 requests, 256 at a time, new connection each; median of {rounds}")
    for name in ("templated", "plain"):
        run = storm_median[name]
        print(f"  {name:<10} errors {run['non200'] + run['socket_errors']:.0f}, p50 {run['p50_us'] / 1000:.1f} ms, "
              f"p99 {run['p99_us'] / 1000:.1f} ms")
    storm_ratio = storm_median["templated"]["p99_us"] / storm_median["plain"]["p99_us"]
    print(f"  templated p99 / untemplated p99                        {storm_ratio:.2f} "
          f"({'met' if storm_ratio <= 1.2 else 'MISSED'}: <= 1.2)")
    print(f"PSS of the templated server, every process, after the storms  {pss:.0f} MB "
          f"({'met' if pss < 300 else 'MISSED'}: < 300 MB)")


if __name__ == "__main__":
    import perfdoc

    with perfdoc.recorded("inventory.py", write=not {"--quick", "--no-docs"} & set(sys.argv)):
        main()
