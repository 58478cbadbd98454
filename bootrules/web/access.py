"""Who may see the status page, the API and /healthz's details.

Who booted what is nobody else's business: they answer loopback and --admin-allow networks
only, judged on the real peer address (through trusted proxies, as the `client` selector
is). A request that a proxy bootrules does not trust forwarded is refused: who sent it
cannot be known. And they answer only to a Host header that names this server: an IP
address, `localhost`, --base-url's host or an --admin-host name. A web page on a domain
the attacker points at 127.0.0.1 (DNS rebinding) would otherwise read every machine
through an operator's browser; its requests carry the attacker's domain as their Host.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Iterable

from ..settings import Settings
from ..values import Network
from .proxies import FORWARDING_HEADERS, PROXY_KEY, plain_address

# This host's own loopback address: where a browser or curl on the server itself comes from.
# (Not all of 127.0.0.0/8: a local service may relay others' requests from 127.0.0.x.)
OWN_ADDRESSES = frozenset({"127.0.0.1", "::1"})
LOCAL_NAMES = frozenset({"localhost", "localhost."})


def admin_allowed(peer: str, networks: Iterable[Network]) -> bool:
    """Tell whether `peer` (the real client address) may see the status page."""
    address = plain_address(peer or "")
    if address is None:
        return False
    if address in OWN_ADDRESSES:
        return True
    parsed = ipaddress.ip_address(address)
    return any(parsed in network for network in networks)


def host_name(host: str) -> str:
    """The name part of a Host header (no port, no IPv6 brackets), lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str, settings: Settings) -> bool:
    """Tell whether a Host header names this server (see the module's doc)."""
    name = host_name(host)
    if not name:
        return False
    try:
        ipaddress.ip_address(name)
        return True  # an address cannot be rebound
    except ValueError:
        pass
    if name in LOCAL_NAMES or name in settings.admin_hosts:
        return True
    return bool(settings.base_url) and name == (urllib.parse.urlsplit(settings.base_url).hostname or "")


def refusal(environ: dict, settings: Settings) -> tuple[int, str] | None:
    """Why this request may not see admin data, as (status, one line); None if it may."""
    if PROXY_KEY not in environ and any(header in environ for header in FORWARDING_HEADERS):
        return 403, ("403 Forbidden: this request came through a proxy bootrules does not trust, so who sent "
                     "it is unknown (start bootrules with --trusted-proxy ADDRESS)")
    if not admin_allowed(environ.get("REMOTE_ADDR", ""), settings.admin_allow):
        return 403, "403 Forbidden: the status page answers this host (127.0.0.1, ::1) and --admin-allow networks only"
    if not host_allowed(environ.get("HTTP_HOST", ""), settings):
        return 421, ("421 Misdirected Request: the status page answers to this server's addresses, localhost, "
                     "--base-url's host and --admin-host names only")
    return None
