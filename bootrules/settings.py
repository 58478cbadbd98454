"""Every setting of bootrules, in one list, read from flags and BOOTRULES_* in one place.

`SETTINGS` is the single list: the command line's options, `--help`'s table of variables
and the README's settings table (held equal by a test) all come from it. `Settings.load`
turns what was given into one frozen object, reporting every wrong value at once.
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Mapping

from .errors import SettingsError
from .values import MAX_DURATION, Network, parse_duration, unmapped_network

__all__ = ["SETTINGS", "Settings", "SettingsError", "MAX_DURATION", "Network", "parse_duration"]


LOG_FORMATS = ("text", "json")
DEFAULT_IPXE_DIR = "/usr/lib/ipxe"  # Debian's ipxe package
IPXE_BINARIES = ("ipxe.efi", "snponly.efi", "undionly.kpxe")
SERVERS = ("waitress", "granian")
# The peer names itself in the Host header; only this alphabet reaches the entry script.
HOST_PATTERN = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
PREFIX_PATTERN = re.compile(r"(?:/[A-Za-z0-9._~-]+)*")


# --------------------------------------------------------------------------- parsers
# Each takes the text given and returns the value, or raises ValueError with the reason.


def integer(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            number = int(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if not low <= number <= high:
            raise ValueError(f"{number} is out of range ({low} to {high})")
        return number

    return parse


def seconds(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            number = float(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a number of seconds") from None
        if not low <= number <= high:
            raise ValueError(f"{text!r} is out of range ({low:g} to {high:g} seconds)")
        return number

    return parse


def choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"{text!r} is not one of: {', '.join(options)}")
        return text

    return parse


def parse_state(text: str) -> str | None:
    """Where machine state is kept: a SQLite file path, or a postgresql:// URL."""
    text = text.strip()
    if not text:
        return None
    if "://" in text and not text.startswith(("postgresql://", "postgres://")):
        raise ValueError(f"{text!r}: give a file path (SQLite) or a postgresql:// URL")
    return text


def parse_path(text: str) -> str | None:
    """A file or folder path (empty: not given)."""
    return text.strip() or None


def parse_keep(text: str) -> int:
    """How long a machine seen stays listed: a duration, or 0 (`off`) to record no machines."""
    if text.strip().lower() in ("0", "off"):
        return 0
    return parse_duration(text)


def nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("is empty")
    return text


def parse_base_url(text: str) -> str | None:
    """The public URL machines reach bootrules at (e.g. http://boot.example.com/pxe)."""
    if not text:
        return None
    parts = urllib.parse.urlsplit(text.strip())
    path = parts.path.rstrip("/")
    if (
        parts.scheme not in ("http", "https")
        or not HOST_PATTERN.fullmatch(parts.netloc or "")
        or not PREFIX_PATTERN.fullmatch(path)
        or parts.query
        or parts.fragment
    ):
        raise ValueError(f"{text!r} must look like http://host[:port][/path]")
    return f"{parts.scheme}://{parts.netloc}{path}"


_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*\.?")


def parse_host_names(text: str) -> tuple[str, ...]:
    """Host names (no port), separated by commas or spaces; compared in lower case."""
    names = []
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        if not _HOST_NAME.fullmatch(item):
            raise ValueError(f"{item!r} is not a host name")
        names.append(item.lower())
    return tuple(names)


def parse_networks(text: str) -> tuple[Network, ...]:
    """Addresses or CIDR ranges, separated by commas or spaces."""
    networks = []
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an address or CIDR range") from None
        networks.append(unmapped_network(network))
    return tuple(networks)


# --------------------------------------------------------------------------- the list


@dataclass(frozen=True)
class Setting:
    """One setting: its attribute, flag, variable, default and how its text is read."""

    name: str
    flag: str
    meaning: str
    default: Any
    shown_default: str
    parse: Callable[[str], Any]
    many: bool = False  # the flag may be repeated; the variable separates values by commas

    @property
    def env(self) -> str:
        return "BOOTRULES_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("rules", "--rules", "rules file", "rules.yaml", "`rules.yaml`", nonempty),
    Setting("host", "--host", "listen address (`serve`)", "127.0.0.1", "`127.0.0.1`", nonempty),
    Setting("port", "--port", "listen port (`serve`)", 8080, "`8080`", integer(0, 65535)),
    Setting("base_url", "--base-url", "public URL for the entry script", None, "from each request", parse_base_url),
    Setting("trusted_proxies", "--trusted-proxy",
            "proxies whose `X-Forwarded-*` is believed (comma-separated)", (), "none", parse_networks, many=True),
    Setting("workers", "--workers", "worker processes sharing the port (0: one per CPU core)", 0,
            "one per CPU core", integer(0, 64)),
    Setting("server", "--server", "HTTP server in each worker: `waitress`, or `granian` (an extra install)",
            "waitress", "`waitress`", choice(SERVERS)),
    Setting("connection_limit", "--connection-limit", "open connections per worker", 1000, "`1000`",
            integer(10, 100000)),
    Setting("channel_timeout", "--channel-timeout", "seconds an idle or stalled connection is kept", 30, "`30`",
            integer(1, 3600)),
    Setting("log_format", "--log-format", "`text` or `json`", "text", "`text`", choice(LOG_FORMATS)),
    Setting("poll_interval", "--poll-interval", "seconds between checks of the rules file (0: never)", 1.0, "`1`",
            seconds(0, 3600)),
    Setting("state", "--state",
            "machine state (`once:` rules, machines seen): a SQLite file, or a `postgresql://` URL", None,
            "`bootrules-state.db` beside the rules file", parse_state),
    Setting("once_expires", "--once-expires", "how long a `once:` token lives (a rule's `expires:` wins)", 86400,
            "`24h`", parse_duration),
    Setting("machines_keep", "--machines-keep",
            "how long a machine seen stays listed after its last boot (`0`: record no machines)", 30 * 86400,
            "`30d`", parse_keep),
    Setting("machines_max", "--machines-max", "most machines listed (the least recently seen go first)", 200000,
            "`200000`", integer(100, 10_000_000)),
    Setting("admin_allow", "--admin-allow",
            "networks that may see `/ui/` and `/api/` (127.0.0.1 and ::1 always may; comma-separated)", (),
            "127.0.0.1 and ::1 only", parse_networks, many=True),
    Setting("ipxe_dir", "--ipxe-dir",
            "folder of the iPXE binaries served over HTTP (`ipxe.efi`, `snponly.efi`, `undionly.kpxe`); given, all must be there",
            None, "`/usr/lib/ipxe`, if there", parse_path),
    Setting("shim_file", "--shim-file", "the signed shim served as `/shimx64.efi`, for Secure Boot machines", None,
            "none", parse_path),
    Setting("grub_file", "--grub-file", "the signed GRUB (with `http`) served as `/grubx64.efi` after the shim", None,
            "none", parse_path),
    Setting("admin_hosts", "--admin-host",
            "host names `/ui/` and `/api/` answer to, besides addresses, `localhost` and `--base-url`'s (comma-separated)",
            (), "none", parse_host_names, many=True),
)
BY_NAME = {setting.name: setting for setting in SETTINGS}


@dataclass(frozen=True)
class Settings:
    """The settings in force: flags first, then BOOTRULES_* variables, then defaults."""

    rules: str = "rules.yaml"
    host: str = "127.0.0.1"
    port: int = 8080
    base_url: str | None = None
    trusted_proxies: tuple[Network, ...] = ()
    workers: int = 0
    server: str = "waitress"
    connection_limit: int = 1000
    channel_timeout: int = 30
    log_format: str = "text"
    poll_interval: float = 1.0
    state: str | None = None
    once_expires: int = 86400
    machines_keep: int = 30 * 86400
    machines_max: int = 200000
    admin_allow: tuple[Network, ...] = ()
    ipxe_dir: str | None = None
    shim_file: str | None = None
    grub_file: str | None = None
    admin_hosts: tuple[str, ...] = ()

    @classmethod
    def load(cls, given: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> "Settings":
        """Build the settings from `given` (flags or arguments; None: not given) and `environ`.

        Raises SettingsError listing every wrong value, each named by its flag or variable.
        """
        given = given or {}
        environ = os.environ if environ is None else environ
        unknown = set(given) - set(BY_NAME)
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        problems: list[str] = []
        for setting in SETTINGS:
            value = given.get(setting.name)
            if value is None or (setting.many and value == ()):
                if setting.env in environ:
                    source, texts = setting.env, [environ[setting.env]]
                else:
                    values[setting.name] = setting.default
                    continue
            else:
                source = setting.flag
                texts = [str(item) for item in value] if setting.many and not isinstance(value, str) else [str(value)]
            try:
                if setting.many:
                    values[setting.name] = tuple(item for text in texts for item in setting.parse(text))
                else:
                    values[setting.name] = setting.parse(texts[0])
            except ValueError as error:
                problems.append(f"{source}: {error}")
        if problems:
            raise SettingsError(problems)
        return cls(**values)

    def state_location(self) -> str:
        """Where machine state lives: as set, or `bootrules-state.db` beside the rules file."""
        return self.state or os.path.join(os.path.dirname(os.path.abspath(self.rules)), "bootrules-state.db")

    def machines_location(self) -> str:
        """Where the machines seen are kept: the same PostgreSQL, or a SQLite file of their own
        beside the state file (`state.db` -> `state-machines.db`). SQLite lets one process write a
        file at a time: in a file of their own, the batches of machines seen never keep a
        `once:` decision waiting for the lock."""
        location = self.state_location()
        if "://" in location:
            return location
        root, extension = os.path.splitext(location)
        return f"{root}-machines{extension or '.db'}"

    def served_binaries(self) -> dict[str, str]:
        """The boot programs served over HTTP, by path (`/ipxe.efi` → its file): iPXE's from
        --ipxe-dir (Debian's folder if it is there), and the shim and GRUB if given."""
        folder = self.ipxe_dir or (DEFAULT_IPXE_DIR if os.path.isdir(DEFAULT_IPXE_DIR) else None)
        served = {f"/{name}": os.path.join(folder, name) for name in IPXE_BINARIES} if folder else {}
        if self.shim_file:
            served["/shimx64.efi"] = self.shim_file
        if self.grub_file:
            served["/grubx64.efi"] = self.grub_file
        return served

    def missing_binaries(self) -> list[str]:
        """What is given but not there: each a line for a clear error at start."""
        served = self.served_binaries()
        given = {path for path, file in served.items()
                 if (self.ipxe_dir and path[1:] in IPXE_BINARIES) or file in (self.shim_file, self.grub_file)}
        return [f"{served[path]}: not there ({BY_NAME['ipxe_dir'].flag if path[1:] in IPXE_BINARIES else 'given'})"
                for path in sorted(given) if not os.path.isfile(served[path])]

    def resolved_workers(self) -> int:
        """The number of worker processes: as set, or one per CPU core."""
        return self.workers or os.cpu_count() or 1


assert [f.name for f in fields(Settings)] == [s.name for s in SETTINGS], "Settings and SETTINGS disagree"


def environment_help(settings: Iterable[Setting] = SETTINGS) -> str:
    """The variables, one a line, for `--help`."""
    width = max(len(setting.env) for setting in settings)
    return "\n".join(f"  {setting.env:<{width}}  {setting.flag}" for setting in settings)


def settings_table(settings: Iterable[Setting] = SETTINGS) -> str:
    """The settings as the Markdown table of docs/operations.md (a test holds the two equal)."""
    rows = ["| variable | flag | meaning | default |", "| --- | --- | --- | --- |"]
    rows += [f"| `{setting.env}` | `{setting.flag}` | {setting.meaning} | {setting.shown_default} |"
             for setting in settings]
    return "\n".join(rows)
