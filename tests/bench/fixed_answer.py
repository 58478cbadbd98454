"""Bench helper: `bootrules serve` whose workers answer /ipxe and /boot.ipxe each with one
fixed script, without deciding anything.

    python tests/bench/fixed_answer.py SCRIPTS_DIR serve --rules … --port … --server granian

SCRIPTS_DIR holds the two answers' bodies as files `ipxe` and `boot.ipxe` (nginx's
static root in servers.py).
Everything else is bootrules' own serving: the leader, the forked workers on one socket,
waitress's loop or granian's worker, the same headers and body size. What such a server
does is the most waitress or granian can do under bootrules' serving, however cheap a
decision became; servers.py measures it beside the real one. It is an instrument, never a
way to serve machines.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import bootrules.serve.worker as worker  # noqa: E402
from bootrules.cli import cli  # noqa: E402
from bootrules.web.answers import http_date  # noqa: E402

FIXED_PATHS = ("/ipxe", "/boot.ipxe")


class FixedAnswers:
    """The app's boot endpoints replaced by fixed answers: the headers a decision sends, and
    the body of `bodies[path]`."""

    def __init__(self, app: Any, bodies: dict[str, bytes]) -> None:
        self.app = app
        self.answers = {path: ([("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store"), ("X-Bootrules-Rule", "fixed"),
                                ("X-Bootrules-Action", "chain"), ("X-Bootrules-Source", "rules.yaml:1")], body)
                        for path, body in bodies.items()}
        self.wsgi_app = self  # granian's worker asks the app's wsgi_app for `direct`
        self.extensions = app.extensions  # the worker writes what the app's services hold when it stops

    def direct(self, environ: dict) -> tuple[str, list[tuple[str, str]], bytes] | None:
        found = self.answers.get(environ.get("PATH_INFO"))
        if found is None:
            return None
        headers, body = found
        return "200 OK", [("Date", http_date()), *headers], body

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        found = self.direct(environ)
        if found is None:  # /healthz and the rest: bootrules' own
            return self.app(environ, start_response)
        status, headers, body = found
        start_response(status, headers)
        return [body]


def main() -> None:
    scripts = Path(sys.argv.pop(1))
    bodies = {path: (scripts / path.lstrip("/")).read_bytes() for path in FIXED_PATHS}
    create_app = worker.create_app
    worker.create_app = lambda **options: FixedAnswers(create_app(**options), bodies)
    cli()


if __name__ == "__main__":
    main()
