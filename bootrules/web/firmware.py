"""What firmware without iPXE fetches from bootrules: the boot programs (iPXE, the signed
shim and GRUB) with their length, the autoexec.ipxe newer iPXE runs first when the
firmware loaded it over HTTP, and GRUB's entry script (docs/firmware.md).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable

from ..decide.grub import render_grub_entry
from ..decide.render import render_entry
from ..logs import log_fields
from ..settings import Settings
from .answers import http_date, request_url_root, respond

log = logging.getLogger("bootrules")

DECISION_PATH = "/ipxe"
# What iPXE loaded over HTTP by the firmware runs first, from the folder it was loaded from.
AUTOEXEC_PATH = "/autoexec.ipxe"
GRUB_ENTRY_PATH = "/grub/grub.cfg"  # what GRUB loaded over HTTP reads first
GRUB_DECISION_PATH = "/grub/decide"
BINARY_TYPE = "application/efi"
SERVED_FIELDS = ("file", "client")

Handler = Callable[[dict, Callable[..., Any], str], Iterable[bytes]]


class FirmwareFiles:
    """The answers to what firmware fetches, by path."""

    def __init__(self, settings: Settings) -> None:
        self.base_url = settings.base_url
        self.binaries = settings.served_binaries()

    def handler(self, path: str) -> Handler | None:
        """What answers `path`, if it is one of these; None otherwise."""
        if path == AUTOEXEC_PATH:
            return self.autoexec
        if path == GRUB_ENTRY_PATH:
            return self.grub_entry
        if "/" + path.lstrip("/") in self.binaries:  # shim asks for //grubx64.efi
            return self.binary
        return None

    def autoexec(self, environ: dict, start_response: Callable[..., Any], method: str) -> Iterable[bytes]:
        """GET /autoexec.ipxe: what iPXE loaded by the firmware over HTTP runs first (its network
        device closed): the entry script, opening the device first."""
        return self._entry(environ, start_response, method, "autoexec.ipxe", DECISION_PATH,
                           lambda url: render_entry(url, open_network=True))

    def grub_entry(self, environ: dict, start_response: Callable[..., Any], method: str) -> Iterable[bytes]:
        """GET /grub/grub.cfg: GRUB's entry script (bootrules.decide.grub)."""
        return self._entry(environ, start_response, method, "grub/grub.cfg", GRUB_DECISION_PATH, render_grub_entry)

    def _entry(self, environ: dict, start_response: Callable[..., Any], method: str, name: str, decision_path: str,
               render: Callable[[str], str]) -> Iterable[bytes]:
        """An entry script: what asks `decision_path` of this server, as the machine reaches it."""
        try:
            url = (self.base_url or request_url_root(environ)) + decision_path
        except ValueError as error:
            return respond(start_response, "400 Bad Request", f"{error}; set --base-url\n", (), method)
        log_fields("served file=%s client=%s", (name, environ.get("REMOTE_ADDR") or "-"), SERVED_FIELDS)
        return respond(start_response, "200 OK", render(url), (), method)

    def binary(self, environ: dict, start_response: Callable[..., Any], method: str) -> Iterable[bytes]:
        """GET or HEAD /ipxe.efi, /snponly.efi, /undionly.kpxe, /shimx64.efi, /grubx64.efi: a boot
        program, with its length (the firmware asks HEAD first, for the size)."""
        path = self.binaries["/" + environ.get("PATH_INFO", "").lstrip("/")]
        try:
            with open(path, "rb") as stream:
                data = b"" if method == "HEAD" else stream.read()
                size = os.fstat(stream.fileno()).st_size
        except OSError as error:
            log.error("cannot read %s: %s", path, error.strerror or error)
            return respond(start_response, "404 Not Found", f"404 Not Found: {os.path.basename(path)} cannot be read "
                            "on the server (see its log)\n", (), method)
        if method != "HEAD":
            log_fields("served file=%s client=%s", (os.path.basename(environ.get("PATH_INFO", "")),
                                                     environ.get("REMOTE_ADDR") or "-"), SERVED_FIELDS)
        start_response("200 OK", [("Date", http_date()), ("Content-Type", BINARY_TYPE), ("Content-Length", str(size)),
                                  ("Cache-Control", "no-cache")])
        return [data] if method != "HEAD" else []
