"""The iPXE scripts bootrules sends: the entry script, and one small renderer per action.

Scripts are built only from values the loader already checked (see loader.word_problem);
nothing a machine sends ever reaches them. Every command that can fail jumps to one
label that says what failed and exits, so a machine never hangs at an iPXE prompt: it
goes on to its next boot device.
"""

from __future__ import annotations

import re

from ..model import Boot, Chain, Exit, Menu, MenuItem, Rule, Sanboot, Setting
from ..values import ENTRY_QUERY_NAMES

FAILED_LABEL = "bootrules_failed"
OR_FAIL = f" || goto {FAILED_LABEL}"

# What the entry script reports: the iPXE expansion of each query key. Free text goes as
# `:hexraw` because iPXE does not URL-encode `${serial}` and old builds leave `&` and `+`
# raw even with `:uristring`; hex survives every version exactly.
_EXPANSIONS = {
    "mac": "${netX/mac:hexhyp}",
    "uuid": "${uuid}",
    "serial_hex": "${serial:hexraw}",
    "product_hex": "${product:hexraw}",
    "manufacturer_hex": "${manufacturer:hexraw}",
    "asset_hex": "${asset:hexraw}",
    "hostname_hex": "${hostname:hexraw}",
    "ip": "${netX/ip}",
    "ip6": "${netX/ip6}",  # empty (so absent) where the build or the network has no IPv6
    "platform": "${platform}",
    "buildarch": "${buildarch}",
}
# (query key, iPXE expansion), in the order bootrules.values reads them fastest.
ENTRY_FACTS = tuple((name, _EXPANSIONS[name]) for name in ENTRY_QUERY_NAMES)


def render_entry(decision_url: str, open_network: bool = False) -> str:
    """Return the entry script that sends a machine's facts to `decision_url` (…/ipxe).

    `open_network`: first open the network device and make sure it has an address (iPXE
    loaded by the firmware over HTTP runs `autoexec.ipxe` with its device closed).
    """
    query = "&".join(f"{key}={expansion}" for key, expansion in ENTRY_FACTS)
    opening = (f"ifopen{OR_FAIL}\nisset ${{ip}} || isset ${{net0/ip6}} || dhcp{OR_FAIL}\n" if open_network else "")
    return (
        "#!ipxe\n"
        "# bootrules entry script: report what this machine is, then run what rules.yaml decides.\n"
        f"{opening}"
        f"chain --replace --autofree {decision_url}?{query}{OR_FAIL}\n"
        f":{FAILED_LABEL}\n"
        f"echo bootrules: could not fetch the boot decision from {decision_url}\n"
        "echo bootrules: falling back to the next boot device\n"
        "exit 1\n"
    )


def render_no_match() -> str:
    """Return the script for a machine no rule matches: leave iPXE for the next boot device."""
    return (
        "#!ipxe\n"
        "# bootrules: no rule matched this machine\n"
        "echo bootrules: no rule matched this machine; booting from the next boot device\n"
        "exit 1\n"
    )


SECRET_MASK = "********"


DONE_SETTING = "bootrules-done"


def render_rule(rule: Rule, reveal_secrets: bool = True, done_url: str | None = None) -> str:
    """Return the decision script for a machine that `rule` matched.

    reveal_secrets=False masks secret settings, for showing a script to a person.
    `done_url` (a `once:` rule): set as ${bootrules-done} first, for the rule to pass on
    to the installer, which POSTs to it when the machine is installed.
    """
    head = f"#!ipxe\n# bootrules: rule '{rule.name}' (line {rule.line})\n"
    if done_url is not None:
        head += f"set {DONE_SETTING} {done_url}\n"
    settings = "".join(_render_setting(setting, reveal_secrets) for setting in rule.settings)
    action = rule.action
    if isinstance(action, Menu):
        return head + settings + _render_menu(rule.name, action, reveal_secrets)
    if isinstance(action, Exit):
        # A failed `set` jumps to the failure label, which must exist.
        tail = _failure_label(rule.name, "set") if settings else ""
        return head + settings + _render_exit(rule.name, action) + tail
    return head + settings + _render_action(action) + "exit 0\n" + _failure_label(rule.name, rule.action_name)


def _render_action(action: Chain | Sanboot | Boot) -> str:
    if isinstance(action, Chain):
        return _render_chain(action)
    if isinstance(action, Sanboot):
        return _render_sanboot(action)
    return _render_boot(action)


def _render_setting(setting: Setting, reveal: bool) -> str:
    value = setting.value if reveal or not setting.secret else SECRET_MASK
    return f"set {setting.name} {value}{OR_FAIL}\n"


def _render_exit(name: str, action: Exit) -> str:
    return f"echo bootrules: rule '{name}': booting from the next boot device\nexit {action.status}\n"


def _render_chain(action: Chain) -> str:
    # --replace: the chained script takes this one's place, so its own `exit` goes
    # straight back to the firmware instead of returning here as a failure.
    return f"chain --replace --autofree {action.url}{OR_FAIL}\n"


def _render_sanboot(action: Sanboot) -> str:
    words = ["sanboot"]
    if action.drive is not None:
        words.append(f"--drive 0x{action.drive:02x}")
    if action.no_describe:
        words.append("--no-describe")
    if action.keep:
        words.append("--keep")
    if action.filename:
        words.append(f"--filename {action.filename}")
    words.extend(action.uris)
    return " ".join(words) + f"{OR_FAIL}\n"


def _render_boot(action: Boot) -> str:
    # Under UEFI the kernel's EFI stub loads its initrds itself, by the names given as
    # `initrd=` on its command line (iPXE builds before LoadFile2 support have no other
    # way): each initrd is fetched under a name and named there. A BIOS kernel is handed
    # the initrds by iPXE and ignores the argument. Args that name an initrd are left as written.
    names = [] if "initrd=" in action.args else _initrd_names(action.initrds)
    kernel = " ".join(["kernel", action.kernel, *(f"initrd={name}" for name in names), action.args]).rstrip()
    initrds = [f"initrd --name {name} {url}" for name, url in zip(names, action.initrds)] if names else [
        f"initrd {url}" for url in action.initrds]
    return "".join(f"{line}{OR_FAIL}\n" for line in [kernel, *initrds, "boot"])


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _initrd_names(urls: tuple[str, ...]) -> list[str]:
    """A distinct, plain name for each initrd: the URL's file name where it is one."""
    names: list[str] = []
    for number, url in enumerate(urls):
        name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        if not _PLAIN_NAME.fullmatch(name) or name in names:
            name = f"initrd{number}"
        names.append(name)
    return names


def _failure_label(name: str, what: str) -> str:
    # Reached only by a jump: an action that returns success goes on to `exit 0` before it.
    return (
        f":{FAILED_LABEL}\n"
        f"echo bootrules: rule '{name}': {what} failed; falling back to the next boot device\n"
        "exit 1\n"
    )


MENU_CHOICE = "bootrules-choice"  # the iPXE setting `choose` stores the item in
ITEM_LABEL = "bootrules-item-"


def _render_menu(name: str, menu: Menu, reveal: bool) -> str:
    """iPXE's menu, item and choose; each item's section ends in its action, and any failure
    (Esc at the menu included) falls back to the next boot device like a rule's."""
    lines = [f"menu {menu.title}{OR_FAIL}\n"]
    lines += [f"item {ITEM_LABEL}{item.key} {item.label}{OR_FAIL}\n" for item in menu.items]
    timeout = f"--timeout {menu.timeout} " if menu.timeout else ""
    lines.append(f"choose {timeout}--default {ITEM_LABEL}{menu.default} {MENU_CHOICE}{OR_FAIL}\n")
    lines.append(f"goto ${{{MENU_CHOICE}}}{OR_FAIL}\n")
    for item in menu.items:
        lines.append(f":{ITEM_LABEL}{item.key}\n")
        lines += [_render_setting(setting, reveal) for setting in item.settings]
        lines.append(_render_item_action(name, item))
    return "".join(lines) + _failure_label(name, f"menu item ${{{MENU_CHOICE}}}")


def _render_item_action(name: str, item: MenuItem) -> str:
    if isinstance(item.action, Exit):
        return (f"echo bootrules: rule '{name}', item '{item.key}': booting from the next boot device\n"
                f"exit {item.action.status}\n")
    return _render_action(item.action) + "exit 0\n"


_UNSAFE_IN_ECHO = re.compile(r"[^A-Za-z0-9 ._:,'()/=-]")


def render_template_failure(rule: Rule, reason: str) -> str:
    """The script of a rule that could not be rendered for this machine: say which rule and
    why (the reason names a variable or a field, never a value), then leave iPXE."""
    shown = _UNSAFE_IN_ECHO.sub("?", reason)[:200]
    return (
        f"#!ipxe\n# bootrules: rule '{rule.name}' (line {rule.line})\n"
        f"echo bootrules: rule '{rule.name}': {shown}; falling back to the next boot device\n"
        "exit 1\n"
    )
