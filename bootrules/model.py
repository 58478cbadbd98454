"""The rules as bootrules holds them after loading: small frozen objects, checked once.

A rule is a name, the selectors a machine must satisfy (all of them), optional iPXE
settings, and exactly one action. Nothing here knows about YAML, HTTP or iPXE syntax.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

Facts = Mapping[str, str]
"""What a machine told us, by selector key, each value already normalised."""


# --------------------------------------------------------------------------- patterns


@dataclass(frozen=True, slots=True)
class Exact:
    """A value that must equal the machine's value (both normalised)."""

    value: str

    def matches(self, value: str) -> bool:
        """Tell whether the machine's value is this one."""
        return value == self.value


@dataclass(frozen=True, slots=True)
class Glob:
    """A shell-style pattern (`*`, `?`, `[...]`), compiled once at load time."""

    text: str
    # None for the common `literal*` form, which is a prefix test (no regex to compile,
    # which was most of the time loading a file of many globs took).
    regex: re.Pattern[str] | None = field(compare=False)
    # Literal text before the first wildcard, in the form facts are stored in; the
    # matcher uses it to find candidate rules without trying every glob.
    prefix: str
    # MAC and UUID globs written without separators (`000c29*`, `4c4c4544004235*`) match
    # the value without its separators.
    bare: bool = False

    def matches(self, value: str) -> bool:
        """Tell whether the machine's value fits the pattern."""
        subject = value.replace(":", "").replace("-", "") if self.bare else value
        if self.regex is None:
            return subject.startswith(self.text[:-1])
        return self.regex.fullmatch(subject) is not None


@dataclass(frozen=True, slots=True)
class Network:
    """An address range (CIDR); a single address is a /32 or /128."""

    network: Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

    def matches(self, value: str) -> bool:
        """Tell whether the machine's address lies in this range."""
        return ipaddress.ip_address(value) in self.network


Pattern = Union[Exact, Glob, Network]


@dataclass(frozen=True, slots=True)
class Selector:
    """One `match:` entry: the machine's value for `key` must fit any of the patterns."""

    key: str
    patterns: tuple[Pattern, ...]
    # Every pattern is an exact value, so the selector names its machines.
    exact: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "exact", all(isinstance(pattern, Exact) for pattern in self.patterns))

    def matches(self, facts: Facts) -> bool:
        """Tell whether the machine has a value for this key that fits a pattern."""
        value = facts.get(self.key)
        if value is None:
            return False
        patterns = self.patterns
        if len(patterns) == 1:  # most selectors: no generator to make
            return patterns[0].matches(value)
        return any(pattern.matches(value) for pattern in patterns)


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Chain:
    """Hand the machine to another script or boot program at `url`."""

    url: str


@dataclass(frozen=True, slots=True)
class Sanboot:
    """Boot from a SAN disk (iSCSI, HTTP disk image…); several URIs are multipath."""

    uris: tuple[str, ...]
    drive: int | None = None
    no_describe: bool = False
    keep: bool = False
    filename: str | None = None


@dataclass(frozen=True, slots=True)
class Boot:
    """Fetch a kernel and its initrds, then boot the kernel with `args`."""

    kernel: str
    initrds: tuple[str, ...] = ()
    args: str = ""


@dataclass(frozen=True, slots=True)
class Exit:
    """Leave iPXE so the firmware tries its next boot device (usually the local disk)."""

    status: int = 1


@dataclass(frozen=True, slots=True)
class MenuItem:
    """One choice of a `menu:`: its own settings and exactly one action (not a menu)."""

    key: str
    label: str
    action: Union[Chain, Sanboot, Boot, Exit]
    settings: tuple["Setting", ...] = ()
    line: int = 0

    @property
    def action_name(self) -> str:
        return type(self.action).__name__.lower()


@dataclass(frozen=True, slots=True)
class Menu:
    """Let a person at the console choose; the default runs after `timeout` ms (0: waits)."""

    title: str
    items: tuple[MenuItem, ...]
    default: str
    timeout: int


Action = Union[Chain, Sanboot, Boot, Exit, Menu]


@dataclass(frozen=True, slots=True)
class Setting:
    """An iPXE `set` line emitted before the action (initiator-iqn, CHAP username…)."""

    name: str
    value: str
    secret: bool = False


@dataclass(frozen=True, slots=True)
class Once:
    """`once:`: answer each machine until it reports done, then let it fall through.

    State is kept per (machine, rule name, label): a new label re-arms every machine.
    """

    label: str
    expires: int  # seconds a token lives once issued (0: the server's default)


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True, slots=True)
class Variable:
    """One of a rule's `vars:`: a default for its templates (a machine's inventory row wins)."""

    name: str
    value: str
    secret: bool = False


@dataclass(frozen=True, slots=True)
class FieldTemplate:
    """A value of a rule that is a template: rendered for each machine, then checked as the
    value written there would be at load time (`check` says why a value cannot go there)."""

    text: str  # as written: the field holds this text until rendered
    template: Any  # bootrules.rules.templates.Template
    check: Callable[[str], str | None]
    what: str  # the field, for messages: "boot args"
    line: int
    words: bool = False  # a value with spaces may go in (a label, a setting), not split anything


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class Rule:
    """One entry of rules.yaml: who it is for, what to set, and what to do."""

    name: str
    line: int
    selectors: tuple[Selector, ...]
    action: Action
    settings: tuple[Setting, ...] = ()
    once: Once | None = None
    vars: tuple[Variable, ...] = ()
    files: tuple[str, ...] = ()  # templates served to the machine under its files URL
    templates: tuple[FieldTemplate, ...] = ()  # the values that are templates

    @property
    def rendered(self) -> bool:
        """Whether the script depends on the machine (templates, or a files URL)."""
        return bool(self.templates or self.files)

    def matches(self, facts: Facts) -> bool:
        """Tell whether every selector of this rule fits the machine (no selector: everyone)."""
        for selector in self.selectors:
            if not selector.matches(facts):
                return False
        return True

    @property
    def action_name(self) -> str:
        """The rules.yaml key of this rule's action (`chain`, `sanboot`, `boot`, `exit`, `menu`)."""
        return type(self.action).__name__.lower()


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The ordered rules of one file; the first rule that matches a machine wins.

    `inventory` gives machines their variables (bootrules.rules.inventory.Inventory),
    `files` the compiled templates rules serve, by name; `watched` every file the rules
    were read from, so that an edit of any of them reloads.
    """

    source: str
    rules: tuple[Rule, ...]
    inventory: Any = None
    files: Mapping[str, Any] = field(default_factory=dict)
    watched: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.rules)


# --------------------------------------------------------------------------- machines


def machine_names(facts: Facts) -> tuple[str, ...]:
    """The names a machine is known by, first the one its state hangs on: its SMBIOS UUID
    (`uuid:…`, when it sent a real one: the same whichever NIC boots), then the MAC of the
    NIC it booted from (`mac:…`)."""
    names = []
    if facts.get("uuid"):
        names.append(f"uuid:{facts['uuid']}")
    if facts.get("mac"):
        names.append(f"mac:{facts['mac']}")
    return tuple(names)


def machine_key(facts: Facts, client: str) -> str:
    """The one name a machine seen is listed under: its first name, else the address it asked from."""
    if facts.get("uuid"):
        return "uuid:" + facts["uuid"]
    mac = facts.get("mac")
    return "mac:" + mac if mac else "ip:" + client
