"""A rule's action: one reader per action key, each checking what iPXE can be given."""

from __future__ import annotations

from typing import Callable

import yaml

from .ipxe_syntax import san_uri_problem, url_problem, word_problem, words_problem
from ..model import Action, Boot, Chain, Exit, Sanboot
from .yaml_nodes import NodeReader, parse_flag

SANBOOT_KEYS = ("uri", "drive", "no-describe", "keep", "filename")
BOOT_KEYS = ("kernel", "initrd", "args")


def read_chain(reader: NodeReader, node: yaml.Node) -> Action | None:
    url = reader.checked(node, "chain", url_problem)
    return None if url is None else Chain(url=url)


def read_sanboot(reader: NodeReader, node: yaml.Node) -> Action | None:
    if not isinstance(node, yaml.MappingNode):
        uris = _san_uris(reader, node)
        return Sanboot(uris=tuple(uris)) if uris else None
    options: dict[str, object] = {}
    uris: list[str] = []
    for key, _key_node, value_node in reader.mapping(node, "sanboot", SANBOOT_KEYS):
        if key == "uri":
            uris = _san_uris(reader, value_node)
        elif key == "drive":
            options["drive"] = reader.integer(value_node, "sanboot drive", 0, 0xFF)
        elif key == "filename":
            options["filename"] = reader.checked(value_node, "sanboot filename", word_problem)
        else:
            options[key.replace("-", "_")] = reader.flag(value_node, f"sanboot {key}")
    if not uris and "drive" not in options:
        reader.problem(node, "sanboot needs 'uri:' (or only 'drive:' to boot a local BIOS disk)")
        return None
    if None in options.values():
        return None
    return Sanboot(uris=tuple(uris), **options)  # type: ignore[arg-type]


def _san_uris(reader: NodeReader, node: yaml.Node) -> list[str]:
    uris = []
    for text, item in reader.texts(node, "sanboot"):
        uri = reader.value(text, item, "sanboot", san_uri_problem)
        if uri is not None:
            uris.append(uri)
    return uris


def read_boot(reader: NodeReader, node: yaml.Node) -> Action | None:
    if not isinstance(node, yaml.MappingNode):
        reader.problem(node, "boot must be a mapping with kernel:, and optionally initrd: and args:")
        return None
    kernel = None
    initrds: list[str] = []
    args = ""
    broken = False
    for key, _key_node, value_node in reader.mapping(node, "boot", BOOT_KEYS):
        if key == "kernel":
            kernel = reader.checked(value_node, "boot kernel", url_problem)
            broken |= kernel is None
        elif key == "initrd":
            for text, item in reader.texts(value_node, "boot initrd"):
                url = reader.value(text, item, "boot initrd", url_problem)
                broken |= url is None
                if url is not None:
                    initrds.append(url)
        else:
            text = reader.checked(value_node, "boot args", words_problem)
            broken |= text is None
            args = text or ""
    if kernel is None:
        if not broken:
            reader.problem(node, "boot needs 'kernel:'")
        return None
    return None if broken else Boot(kernel=kernel, initrds=tuple(initrds), args=args)


def read_exit(reader: NodeReader, node: yaml.Node) -> Action | None:
    text = reader.text(node, "exit")
    if text is None:
        return None
    flag = parse_flag(text)
    if flag is True:
        return Exit()
    if flag is False:
        reader.problem(node, "'exit: false' does nothing; give the rule another action or remove it")
        return None
    status = reader.integer(node, "exit", 0, 255)
    return None if status is None else Exit(status=status)


# The actions a rule can take, in the order they are listed to the user.
ACTION_READERS: dict[str, Callable[[NodeReader, yaml.Node], Action | None]] = {
    "chain": read_chain,
    "sanboot": read_sanboot,
    "boot": read_boot,
    "exit": read_exit,
}
