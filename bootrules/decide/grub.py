"""The same rules for machines that boot through GRUB: Secure Boot's signed shim, then GRUB.

A machine with Secure Boot on cannot run an unsigned iPXE; Debian's signed chain is shim →
GRUB (grubnetx64, with `http`) → a signed kernel. GRUB loaded over HTTP reads
`grub/grub.cfg` from where it came from: bootrules answers it with an entry script that
asks `/grub/decide` with what GRUB knows (its NIC's MAC and address, the SMBIOS UUID, and
the serial, product and manufacturer when they are plain words: GRUB sends a query as
written, and a space or `%` in it breaks the request), and `platform=efi`,
`buildarch=x86_64`, `loader=grub`. The first matching rule answers in GRUB's language:

- `boot`: `linux` and `initrd` from HTTP, then `boot` (the kernel must be signed);
- `exit`: back to the firmware, which tries its next boot option;
- `chain`, `sanboot`, `menu`: GRUB cannot do them there (it refuses an unsigned image and
  has no SAN boot), so the script says so and exits; a rule that names `loader: grub` with
  one of them is an error when the rules load.

`set:` is iPXE's and is left out. In `boot` args, `${bootrules-done}` (iPXE expands it) is
written as the done URL itself. A URL must be `http://`: GRUB's HTTP is plain.
"""

from __future__ import annotations

import urllib.parse

from ..model import Boot, Exit, Rule

ENTRY_FACTS_TEXT = (("serial", 7, 1), ("product", 5, 1), ("manufacturer", 4, 1))  # (fact, SMBIOS string, type)
WORD = "^[A-Za-z0-9._-]+$"


def quoted(text: str) -> str:
    """`text` as one GRUB word: single quotes, in which nothing is expanded."""
    return "'" + text.replace("'", "'\\''") + "'"


def grub_url(url: str) -> str | None:
    """`http://host[:port]/path` as GRUB names it, `(http,host:port)/path`; None for another scheme."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.netloc:
        return None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return f"(http,{parts.netloc})" + path


def render_grub_entry(decision_url: str) -> str:
    """The grub.cfg GRUB fetches first: ask `decision_url` (…/grub/decide) which rule answers."""
    lines = [
        "# bootrules: which rule answers this machine? (GRUB: a machine booting with Secure Boot)",
        "set timeout=0",
        'set bootrules_query="mac=${net_default_mac}&ip=${net_default_ip}&platform=efi&buildarch=x86_64&loader=grub"',
        "smbios --type 1 --get-uuid 8 --set bootrules_uuid",
        'if [ -n "${bootrules_uuid}" ]; then set bootrules_query="${bootrules_query}&uuid=${bootrules_uuid}"; fi',
    ]
    for fact, string, kind in ENTRY_FACTS_TEXT:
        lines += [f"smbios --type {kind} --get-string {string} --set bootrules_{fact}",
                  f"if regexp '{WORD}' \"${{bootrules_{fact}}}\"; then "
                  f'set bootrules_query="${{bootrules_query}}&{fact}=${{bootrules_{fact}}}"; fi']
    target = grub_url(decision_url)
    lines += [f'source "{target}?${{bootrules_query}}"',
              f"echo {quoted(f'bootrules: could not fetch the boot decision from {decision_url}; booting the next device')}",
              "exit", ""]
    return "\n".join(lines)


def render_grub_no_match() -> str:
    return ("# bootrules: no rule matched this machine\n"
            "echo 'bootrules: no rule matched this machine; booting from the next boot device'\nexit\n")


def render_grub(rule: Rule, done_url: str | None = None) -> str:
    """The GRUB script of a rule (its templates rendered already)."""
    head = f"# bootrules: rule '{rule.name}' (line {rule.line})\n"
    action = rule.action
    failed = f"echo {quoted(f'bootrules: rule {rule.name}: boot failed; falling back to the next boot device')}\nexit\n"
    if isinstance(action, Exit):
        return head + f"echo {quoted(f'bootrules: rule {rule.name}: booting from the next boot device')}\nexit\n"
    if not isinstance(action, Boot):
        return head + (f"echo {quoted(f'bootrules: rule {rule.name}: {rule.action_name} is not something GRUB can do; ')}"
                       f"{quoted('booting from the next boot device')}\nexit\n")
    kernel = grub_url(action.kernel)
    initrds = [grub_url(url) for url in action.initrds]
    if kernel is None or None in initrds:
        return head + f"echo {quoted(f'bootrules: rule {rule.name}: GRUB fetches http:// URLs only')}\nexit\n"
    args = action.args.replace("${bootrules-done}", done_url or "")
    # One GRUB word per argument: GRUB hands a word with a space to the kernel in double quotes.
    words = "".join(" " + quoted(word) for word in args.split())
    lines = [f"if linux {kernel}{words}; then"]
    if initrds:
        lines += [f"  if initrd {' '.join(initrds)}; then", "    boot", "  fi"]
    else:
        lines += ["  boot"]
    lines += ["fi"]
    return head + "\n".join(lines) + "\n" + failed
