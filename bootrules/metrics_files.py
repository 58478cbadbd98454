"""The workers' metrics files in PROMETHEUS_MULTIPROC_DIR: each worker's file of decision
counts (DecisionFile), adding those files up for a scrape, folding a dead worker's files
into the archive, and the lock a scrape and a fold share.

prometheus_client's own files (counters, histograms, gauges) are its to write; bootrules
folds a dead worker's into one archive per kind so that a scrape reads one file per live
worker plus one per kind, however many reloads there were. Folding and reading use
prometheus_client's MmapedDict, which is not its public API: `missing_internals` checks
at start that it is there and reads what DecisionFile writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import mmap
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterator

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DECISIONS_SUFFIX = ".decisions"  # not .db: prometheus_client's collector must not read these


def multiprocess() -> bool:
    """Tell whether metrics are shared through files between worker processes."""
    return bool(os.environ.get(MULTIPROC_ENV))


def missing_internals() -> str | None:
    """Why the installed prometheus_client cannot be used with several workers (None: it can).

    Adding up the workers' files (DecisionCounts, worker_exited) uses prometheus_client's
    MmapedDict and its file names, which are not its public API: checked once at start.
    """
    try:
        from prometheus_client import multiprocess as mp
        from prometheus_client.mmap_dict import MmapedDict
    except ImportError as error:
        return str(error)
    needed = [(MmapedDict, name) for name in ("read_value", "write_value", "read_all_values_from_file", "close")]
    needed.append((mp, "mark_process_dead"))
    lacking = [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in needed if not hasattr(owner, name)]
    if not lacking and not _layout_is_prometheus_clients():
        lacking.append("the layout of MmapedDict's files (DecisionFile writes it)")
    return ", ".join(lacking) or None


def _layout_is_prometheus_clients() -> bool:
    """Whether MmapedDict reads what DecisionFile writes, as it was when this was written."""
    from prometheus_client.mmap_dict import MmapedDict

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "check" + DECISIONS_SUFFIX)
        written = DecisionFile(path)
        try:
            for number, key in enumerate(('["a", "b"]', '["ab", "c"]', '["ü", "exit"]'), start=1):
                written.write(written.slot(key), float(number))
        finally:
            written.close()
        try:
            read = [(key, value) for key, value, *_ in MmapedDict.read_all_values_from_file(path)]
        except Exception:  # noqa: BLE001 - any failure to read it is the answer
            return False
    return read == [('["a", "b"]', 1.0), ('["ab", "c"]', 2.0), ('["ü", "exit"]', 3.0)]


_INT = struct.Struct("i")
_DOUBLE = struct.Struct("d")
_NO_VALUE = bytes(16)  # a new key's value and timestamp: 0.0, 0.0


class DecisionFile:
    """One process's file of decision counts, in the layout of prometheus_client's
    multiprocess files, which its MmapedDict reads (and bootrules folds and adds up with
    it): a 4-byte count of the bytes used, 4 bytes of padding, then per key its length (4
    bytes), the key in UTF-8 padded with spaces to an 8-byte boundary, its value and a
    timestamp (8-byte doubles). `missing_internals` checks at start that MmapedDict still
    reads what this writes.

    Written here rather than through MmapedDict, which looks every write's key up twice by
    its text and makes a struct format for each new key (in a boot storm on one-per-MAC
    rules nearly every decision is some rule's first): here a key is looked up when first
    counted, and each count is written at its offset. Only the process whose file it is
    writes it, and a key is written whole before the count of bytes used says it is
    there, so a scrape reading the file meanwhile sees the key or nothing of it.
    """

    INITIAL_SIZE = 1 << 16  # bytes; doubled as needed

    def __init__(self, path: str) -> None:
        self._file = open(path, "a+b")
        size = os.fstat(self._file.fileno()).st_size
        if size == 0:
            self._file.truncate(self.INITIAL_SIZE)
            size = self.INITIAL_SIZE
        self._size = size
        self._map = mmap.mmap(self._file.fileno(), size)
        self._offsets: dict[str, int] = {}  # key -> offset of its value
        used = _INT.unpack_from(self._map, 0)[0]
        if used == 0:
            used = 8
            self._map[0:4] = _INT.pack(used)
        else:  # a process that had this pid before wrote it
            from prometheus_client.mmap_dict import MmapedDict

            for key, _value, _timestamp, offset in MmapedDict.read_all_values_from_file(path):
                self._offsets[key] = offset
        self._used = used

    def slot(self, key: str) -> int:
        """The offset of `key`'s value in the file; a key not there yet is added, at 0."""
        offset = self._offsets.get(key)
        if offset is not None:
            return offset
        encoded = key.encode("utf-8")
        entry = b"".join((_INT.pack(len(encoded)), encoded, b" " * (8 - (len(encoded) + 4) % 8), _NO_VALUE))
        start, end = self._used, self._used + len(entry)
        if end > self._size:
            self._grow(end)
        self._map[start:end] = entry
        self._map[0:4] = _INT.pack(end)  # only now do readers see the key
        self._used = end
        offset = self._offsets[key] = end - 16
        return offset

    def write(self, offset: int, value: float) -> None:
        # Assigned, not struct.pack_into: a reader never sees the value half written.
        self._map[offset:offset + 8] = _DOUBLE.pack(value)

    def read(self, offset: int) -> float:
        return _DOUBLE.unpack_from(self._map, offset)[0]

    def _grow(self, needed: int) -> None:
        size = self._size
        while size < needed:
            size *= 2
        self._file.truncate(size)
        self._map.close()
        self._map = mmap.mmap(self._file.fileno(), size)
        self._size = size

    def close(self) -> None:
        self._map.close()
        self._file.close()


_decision_files: dict[str, DecisionFile] = {}


def decision_file() -> DecisionFile:
    """This process's file of decision counts, opened once (as prometheus_client does its own)."""
    path = os.path.join(os.environ[MULTIPROC_ENV], f"{os.getpid()}{DECISIONS_SUFFIX}")
    if path not in _decision_files:
        _decision_files[path] = DecisionFile(path)
    return _decision_files[path]


def added_up_decision_files() -> dict[tuple[str, str], float]:
    """The decision counts of every process, live or gone, that wrote a file here."""
    from prometheus_client.mmap_dict import MmapedDict

    by_key: dict[str, float] = {}
    for path in glob.glob(os.path.join(os.environ[MULTIPROC_ENV], "*" + DECISIONS_SUFFIX)):
        for key, value, _timestamp, _position in MmapedDict.read_all_values_from_file(path):
            by_key[key] = by_key.get(key, 0.0) + value
    return {tuple(json.loads(key)): total for key, total in by_key.items()}  # type: ignore[misc]


# A dead worker's counter, histogram and decision files are added into these, so that a
# scrape reads one file per live worker plus one per kind, however many reloads there were.
ARCHIVE = "archive"
FOLDED_KINDS = ("counter", "histogram")
LOCK_FILE = "files.lock"


@contextlib.contextmanager
def files_locked(exclusive: bool) -> Iterator[None]:
    """Hold the lock on the metrics files: shared to read them, exclusive to fold them."""
    fd = os.open(os.path.join(os.environ[MULTIPROC_ENV], LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fold(source: str, archive: str) -> None:
    """Add every value of the file `source` into the file `archive`, then remove `source`."""
    from prometheus_client.mmap_dict import MmapedDict

    target = MmapedDict(archive)
    try:
        for key, value, timestamp, _position in MmapedDict.read_all_values_from_file(source):
            total, _previous = target.read_value(key)
            target.write_value(key, total + value, timestamp)
    finally:
        target.close()
    os.unlink(source)


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live gauges, and fold its counts into the archive (multiprocess mode)."""
    if not multiprocess():
        return
    from prometheus_client import multiprocess as mp

    mp.mark_process_dead(pid)
    directory = os.environ[MULTIPROC_ENV]
    with files_locked(exclusive=True):
        for kind in FOLDED_KINDS:
            source = os.path.join(directory, f"{kind}_{pid}.db")
            if os.path.exists(source):
                _fold(source, os.path.join(directory, f"{kind}_{ARCHIVE}.db"))
        source = os.path.join(directory, f"{pid}{DECISIONS_SUFFIX}")
        if os.path.exists(source):
            _fold(source, os.path.join(directory, ARCHIVE + DECISIONS_SUFFIX))


def clear_runtime_files(directory: Path) -> None:
    """Remove metrics files an earlier run left in `directory`."""
    for pattern in ("*.db", "*" + DECISIONS_SUFFIX):
        for stale in directory.glob(pattern):
            stale.unlink()
