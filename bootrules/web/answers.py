"""How the boot path writes an answer: plain-text scripts no cache keeps, built as
(status, headers, body) and sent by WSGI's start_response or handed to granian whole.
"""

from __future__ import annotations

import email.utils
from typing import Any, Callable, Iterable

from werkzeug.wsgi import get_host

from ..clock import PerSecond
from ..settings import HOST_PATTERN, PREFIX_PATTERN

SCRIPT_TYPE = "text/plain; charset=utf-8"
CONTENT_TYPE = "Content-Type"
INTERNAL_ERROR = "500 internal error (see the bootrules log)\n"


def request_url_root(environ: dict) -> str:
    """The URL this request reached bootrules at (as trusted proxies name it), without a path."""
    if not environ.get("HTTP_HOST"):
        # The server would name itself instead (waitress: "waitress.invalid"), which no machine can reach.
        raise ValueError("the request has no Host header")
    host = get_host(environ)
    if not HOST_PATTERN.fullmatch(host):
        raise ValueError("the Host header is not a host name")
    prefix = environ.get("SCRIPT_NAME", "").rstrip("/")
    if not PREFIX_PATTERN.fullmatch(prefix):
        raise ValueError("the forwarded path prefix is not a plain path")
    return f"{environ['wsgi.url_scheme']}://{host}{prefix}"


# Given by the app, the Date header spares waitress formatting one per response.
http_date = PerSecond(lambda second: email.utils.formatdate(second, usegmt=True))


def text_headers(data: bytes, headers: Iterable[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """The headers of a plain-text answer that no cache keeps (scripts change with rules.yaml)."""
    return [("Date", http_date()), (CONTENT_TYPE, SCRIPT_TYPE), ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"), *headers]


# (status line, headers, body): an answer before it is sent, by WSGI or by granian directly.
Answer = tuple[str, list[tuple[str, str]], bytes]


def answer(status: str, body: str, headers: Iterable[tuple[str, str]] = ()) -> Answer:
    data = body.encode()
    return status, text_headers(data, headers), data


def send(start_response: Callable[..., Any], answer: Answer, method: str | None) -> list[bytes]:
    status, headers, body = answer
    start_response(status, headers)
    return [] if method == "HEAD" else [body]


def respond(start_response: Callable[..., Any], status: str, body: str, headers: Iterable[tuple[str, str]],
            method: str | None) -> list[bytes]:
    return send(start_response, answer(status, body, headers), method)
