"""Who is asking: the peer's address, or the client a trusted reverse proxy names.

Anyone can send X-Forwarded-For; believing it from an untrusted peer would let a machine
pick its own `client` address and so its own rules. IPv4 peers reached through an IPv6
socket (`--host ::`) arrive as ::ffff:a.b.c.d; they are unmapped first, so `client:
10.0.0.0/8` and `--trusted-proxy 127.0.0.1` mean the same on either kind of socket.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any, Callable, Iterable, Sequence

from ..logs import escaped
from ..values import Network

log = logging.getLogger("bootrules")

# In the WSGI environ: the trusted proxy a request came through (absent: none).
PROXY_KEY = "bootrules.proxy"
FORWARDING_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")
WSGIApp = Callable[[dict, Callable[..., Any]], Iterable[bytes]]


def plain_address(text: str) -> str | None:
    """`text` as a canonical IP address (IPv4-mapped IPv6 unmapped), or None if it is not one.

    A scoped address (fe80::1%eth0) is not plain: the scope is free text.
    """
    if "%" in text:
        return None
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class TrustedProxies:
    """WSGI middleware: REMOTE_ADDR becomes the real client, X-Forwarded-* believed only from proxies."""

    def __init__(self, app: WSGIApp, networks: Sequence[Network]) -> None:
        self.app = app
        self.networks = tuple(networks)

    def trusted(self, address: str) -> bool:
        """Tell whether the plain address `address` belongs to a trusted proxy."""
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(parsed in network for network in self.networks)

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        self._name_the_client(environ)
        return self.app(environ, start_response)

    def direct(self, environ: dict) -> Any:
        """The app's answer without WSGI's start_response (bootrules.web.boot.BootEndpoints.direct),
        for the request as this middleware names it; None where the app has none."""
        direct = getattr(self.app, "direct", None)
        if direct is None:
            return None
        self._name_the_client(environ)
        return direct(environ)

    def _name_the_client(self, environ: dict) -> None:
        peer = environ.get("REMOTE_ADDR", "")
        if peer.startswith("::ffff:"):
            environ["REMOTE_ADDR"] = peer = plain_address(peer) or peer
        if self.networks and self.trusted(peer):
            self._believe_proxy(environ, peer)

    def _believe_proxy(self, environ: dict, proxy: str) -> None:
        environ[PROXY_KEY] = proxy
        hops = [hop.strip() for hop in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
        # The client is the last address not added by one of our own proxies. A hop that is
        # not a plain address is refused: the request is judged on the proxy's address.
        for hop in reversed(hops):
            address = plain_address(hop)
            if address is None:
                log.warning("proxy=%s sent an X-Forwarded-For hop that is not an IP address, hop=%s; "
                            "judging the request on the proxy's address", proxy, escaped(hop[:100]))
                break
            if not self.trusted(address):
                environ["REMOTE_ADDR"] = address
                break
        proto = environ.get("HTTP_X_FORWARDED_PROTO", "").split(",")[0].strip().lower()
        if proto in ("http", "https"):
            environ["wsgi.url_scheme"] = proto
        host = environ.get("HTTP_X_FORWARDED_HOST", "").split(",")[0].strip()
        if host:
            environ["HTTP_HOST"] = host
        prefix = environ.get("HTTP_X_FORWARDED_PREFIX", "").split(",")[0].strip().rstrip("/")
        if prefix:
            environ["SCRIPT_NAME"] = prefix
