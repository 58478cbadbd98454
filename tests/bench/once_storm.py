"""Bench: a 10,000-machine boot storm on a `once:` rule (SQLite, 2 workers) beside the same storm
on a plain rule. Prints figures; about a minute.

    .venv/bin/python tests/bench/once_storm.py [--rounds 3]

Each round boots 10,000 machines the servers have never seen, so on the `once:` rule every
machine's first decision issues a token and arms a row; rounds alternate between the servers.

Errors are printed by kind: `non200` are answers other than 200, the others wrk's
socket errors (a `connect` error is wrk's own; it connects again).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sqlite3
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import errors_text, median_storm, start_bootrules, storm  # noqa: E402

RULES = """rules:
  - name: install
    match: {mac: "02:*"}
    ONCE
    boot:
      kernel: http://mirror.example.com/linux
      args: bootrules.done=${bootrules-done}
  - name: local-disk
    exit: true
"""


def row_writes(url: str) -> float:
    """Transactions that wrote armed rows, summed over the workers (from /metrics)."""
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    found = re.search(r"^bootrules_once_row_writes_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-docs", action="store_true", help="do not write the figures into docs/performance.md")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bootrules-once-bench-"))
    servers = []
    try:
        (work / "plain.yaml").write_text(RULES.replace("    ONCE\n", ""))
        (work / "once").mkdir()
        (work / "once" / "rules.yaml").write_text(RULES.replace("ONCE", "once: bench"))
        plain = start_bootrules(work / "plain.yaml", 18191, work, args.workers)
        servers.append(plain)
        once = start_bootrules(work / "once" / "rules.yaml", 18192, work, args.workers)
        servers.append(once)
        runs: dict[str, list[dict[str, float]]] = {"plain": [], "once": []}
        for round_number in range(args.rounds):
            for name, server in (("plain", plain), ("once", once)):
                runs[name].append(storm(server.url, "/boot.ipxe", "/ipxe", 10000, first=10000 * round_number))
        state = work / "once" / "bootrules-state.db"

        def count_rows() -> int:
            with sqlite3.connect(state) as db:
                return db.execute("SELECT COUNT(*) FROM bootrules_once").fetchone()[0]

        time.sleep(0.5)  # the last armed rows are written in batches, just after their answers
        rows = count_rows()
        writes = row_writes(once.url)
        # The first round's machines boot again while armed: the same tokens, no new rows.
        again = storm(once.url, "/boot.ipxe", "/ipxe", 10000, first=0)
        time.sleep(0.5)
        rows_after_again = count_rows()
        figures = {name: median_storm(found) for name, found in runs.items()}
        print(f"storm: 10,000 new machines x 2 requests, 256 at a time, {args.workers} workers, {args.rounds} rounds, median")
        for name in ("plain", "once"):
            run = figures[name]
            print(f"  {name:<6} errors {errors_text(run)}, p50 {run['p50_us'] / 1000:.1f} ms, "
                  f"p99 {run['p99_us'] / 1000:.1f} ms, max {run['max_us'] / 1000:.0f} ms, total {run['elapsed_us'] / 1e6:.2f} s;"
                  f" p99 of each round: {', '.join(f'{p / 1000:.1f}' for p in run['p99_each'])} ms")
        ratio = figures["once"]["p99_us"] / figures["plain"]["p99_us"]
        print(f"  once p99 / plain p99: {ratio:.2f} (target <= 1.5)")
        print(f"  state rows after the rounds: {rows:,}, written in {writes:,.0f} transactions (wrk also boots the few machines past each round's "
              f"10,000 that its open connections were already asking for)")
        print(f"  the first round's 10,000 machines again, armed: errors {errors_text(again)}, "
              f"p99 {again['p99_us'] / 1000:.1f} ms; state rows after: {rows_after_again:,} (no new row)")
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    import perfdoc

    with perfdoc.recorded("once_storm.py", write=not {"--quick", "--no-docs", "--flat-only"} & set(sys.argv)):
        main()
