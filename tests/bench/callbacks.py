"""Bench: decisions while clients post made-up tokens to /done/, against a store of a million rows.
Prints figures; about two minutes.

    .venv/bin/python tests/bench/callbacks.py [--rows 1000000] [--posters 16]

A SQLite state store is filled with `--rows` once: rows (armed and done, as a big fleet
leaves them). `serve` (2 workers) then answers a rule without `once:` to wrk, first alone,
then while `--posters` connections post well-formed tokens signed with another key as fast
as they can (a tag to check, no row to find). The figure that matters is the p99 of the
plain decisions beside the posters.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

from run import start_bootrules  # noqa: E402

from bootrules.state import OnceStore  # noqa: E402
from bootrules.state import tokens  # noqa: E402
from bootrules.state.database import open_database  # noqa: E402
from bootrules.state.once_store import OnceRow  # noqa: E402

RULES = """rules:
  - name: install
    match: {mac: "02:*"}
    once: v1
    exit: 3
  - name: plain
    match: {mac: "52:54:00:*"}
    exit: 2
  - name: local-disk
    exit: true
"""
POSTER = """
local tokens = {}
for line in io.lines(os.getenv("TOKENS")) do tokens[#tokens + 1] = line end
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/done/" .. tokens[(n % #tokens) + 1], {["Content-Length"] = "0"})
end
"""


def fill(state: Path, rows: int) -> None:
    """`rows` once: rows under the rule and label in force, a tenth of them done."""
    store = OnceStore(open_database(str(state), patient=True))
    now = time.time()
    batch = []
    for number in range(rows):
        mac = f"mac:02:{number >> 32 & 255:02x}:{number >> 24 & 255:02x}:{number >> 16 & 255:02x}:" \
              f"{number >> 8 & 255:02x}:{number & 255:02x}"
        batch.append(OnceRow(mac, "install", "v1", "armed", f"{number:064d}", now, now + 86400, None, None, (mac,)))
        if len(batch) == 20000:
            store.write_arms(batch)
            batch = []
    if batch:
        store.write_arms(batch)
    store.database.run(lambda cursor: cursor.execute("UPDATE bootrules_once SET state = 'done', done_at = issued_at "
                                                     "WHERE machine LIKE 'mac:02:00:00:0%'"), write=True)
    store.close()


def latency(url: str, seconds: int) -> dict[str, float]:
    """wrk -t1 -c16 on one plain decision: requests a second, p50 and p99 in ms."""
    out = subprocess.run(["wrk", "-t1", "-c16", f"-d{seconds}s", "--latency", "-H", "Connection: close", url],
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for name in ("50", "99"):
        value, unit = re.search(rf"^\s+{name}%\s+([\d.]+)(us|ms|s)$", out, re.M).groups()
        found[f"p{name}"] = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    found["rate"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-docs", action="store_true", help="do not write the figures into docs/performance.md")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--posters", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="100,000 rows, 5 s runs")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.seconds = 100_000, 5
    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing (apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="bootrules-callbacks-"))
    server = None
    try:
        started = time.perf_counter()
        fill(work / "state.db", args.rows)
        filled = time.perf_counter() - started
        rules = work / "rules.yaml"
        rules.write_text(RULES)
        key = tokens.new_key()
        (work / "tokens").write_text("\n".join(
            tokens.issue(key, [f"mac:02:ff:00:00:{n >> 8:02x}:{n & 255:02x}"], "install", "v1", time.time(),
                         time.time() + 3600) for n in range(10000)) + "\n")
        (work / "poster.lua").write_text(POSTER)
        server = start_bootrules(rules, 18480, work, 2, ("--state", str(work / "state.db")))
        url = "http://127.0.0.1:18480"
        decision = f"{url}/ipxe?mac=52:54:00:00:00:01&platform=pcbios"
        alone = latency(decision, args.seconds)
        posters = subprocess.Popen(["wrk", "-t1", f"-c{args.posters}", f"-d{args.seconds + 4}s", "-s",
                                    str(work / "poster.lua"), url], env={"TOKENS": str(work / "tokens")},
                                   stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        beside = latency(decision, args.seconds)
        posted = posters.communicate()[0]
        callbacks = float(re.search(r"Requests/sec:\s+([\d.]+)", posted).group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", posted)
        print(f"state store: {args.rows:,} once: rows (SQLite, filled in {filled:.0f} s); 2 workers")
        print(f"plain decisions, wrk -t1 -c16, new connection each, {args.seconds} s:")
        print(f"  alone                               {alone['rate']:>8,.0f} req/s, p50 {alone['p50']:.1f} ms, "
              f"p99 {alone['p99']:.1f} ms")
        print(f"  beside {args.posters} posters of made-up tokens   {beside['rate']:>8,.0f} req/s, "
              f"p50 {beside['p50']:.1f} ms, p99 {beside['p99']:.1f} ms "
              f"({'met' if beside['p99'] < 50 else 'MISSED'}: p99 < 50 ms)")
        print(f"  the posters meanwhile: {callbacks:,.0f} callbacks a second, "
              f"{int(non2xx.group(1)) if non2xx else 0:,} answered 404")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    import perfdoc

    with perfdoc.recorded("callbacks.py", write=not {"--quick", "--no-docs"} & set(sys.argv)):
        main()
