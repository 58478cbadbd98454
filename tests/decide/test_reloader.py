"""Reloading: edits are picked up, broken edits never replace good rules."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading

import pytest

from bootrules.decide.reloader import Reloader
from support import wait_until

GOOD_A = "rules:\n  - name: version-a\n    exit: true\n"
GOOD_B = "rules:\n  - name: version-b\n    exit: true\n"
BROKEN = "rules:\n  - name: broken\n    chain: not a url\n"


def names(store: Reloader) -> list[str]:
    return [rule.name for rule in store.snapshot.ruleset.rules]


def bump(path, text: str) -> None:
    """Write `text` and move the mtime on, as a save a moment later would."""
    path.write_text(text)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(GOOD_A)
    store = Reloader(str(path), poll_interval=0)
    assert store.reload()
    yield store
    store.stop()


def test_an_edit_is_loaded_once_it_has_settled(store, tmp_path):
    """A changed file is loaded on the poll after the one that first saw the change."""
    bump(tmp_path / "rules.yaml", GOOD_B)
    assert store.reload_if_changed() is False  # just changed: wait one interval
    assert names(store) == ["version-a"]
    assert store.reload_if_changed() is True
    assert names(store) == ["version-b"]
    assert store.reload_if_changed() is False  # nothing new


def test_a_broken_edit_keeps_the_last_good_rules_and_is_logged_once(store, tmp_path, caplog):
    """A broken save leaves the good rules serving; the error is logged once, then cleared."""
    path = tmp_path / "rules.yaml"
    bump(path, BROKEN)
    with caplog.at_level(logging.ERROR, logger="bootrules"):
        for _ in range(5):
            store.reload_if_changed()
    assert names(store) == ["version-a"]
    assert store.last_error is not None
    assert store.last_error.problems == (f"{path}:3: rule 'broken': chain: 'not a url' contains a space, line break or control character",)
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    bump(path, GOOD_B)
    store.reload_if_changed()
    store.reload_if_changed()
    assert names(store) == ["version-b"] and store.last_error is None


def test_a_file_truncated_before_being_rewritten_is_never_served_empty(store, tmp_path):
    """An editor's truncate-then-write is seen as one change once the file settles."""
    path = tmp_path / "rules.yaml"
    bump(path, "")
    store.reload_if_changed()  # sees the truncated file, waits for it to settle
    bump(path, GOOD_B)
    store.reload_if_changed()  # changed again: still waiting
    assert names(store) == ["version-a"] and store.last_error is None
    store.reload_if_changed()
    assert names(store) == ["version-b"]


def test_a_deleted_file_keeps_serving_and_a_restored_one_is_loaded(store, tmp_path):
    """Deleting rules.yaml is reported; putting it back loads it."""
    path = tmp_path / "rules.yaml"
    path.unlink()
    store.reload_if_changed()
    store.reload_if_changed()
    assert names(store) == ["version-a"]
    assert store.last_error.problems == (f"{path}: file not found",)
    bump(path, GOOD_B)
    store.reload_if_changed()
    store.reload_if_changed()
    assert names(store) == ["version-b"]


@contextlib.contextmanager
def watching(path, poll_interval: float):
    """A store on `path` (holding GOOD_A) with its watcher thread running; stopped afterwards."""
    path.write_text(GOOD_A)
    store = Reloader(str(path), poll_interval=poll_interval)
    store.reload()
    store.start()
    try:
        yield store
    finally:
        store.stop()


def test_the_watcher_thread_picks_up_an_edit_within_two_seconds(tmp_path):
    """With the background watcher running, an edit is served within about a second."""
    with watching(tmp_path / "rules.yaml", poll_interval=0.2) as store:
        bump(tmp_path / "rules.yaml", GOOD_B)
        assert wait_until(lambda: names(store) == ["version-b"], timeout=2)


def test_request_reload_reloads_at_once(tmp_path):
    """A forced reload (what SIGHUP does) does not wait for the file to settle."""
    with watching(tmp_path / "rules.yaml", poll_interval=30) as store:
        bump(tmp_path / "rules.yaml", GOOD_B)
        store.request_reload()
        assert wait_until(lambda: names(store) == ["version-b"], timeout=2)


def test_learning_which_files_the_rules_read_never_counts_as_an_edit(tmp_path):
    """With several workers the supervisor learns the inventory's and templates' paths from
    the leader while its watcher thread polls: that moment must not start a second generation."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: rest\n    exit: true\n")
    others = []
    for name in ("inventory.csv", "preseed.cfg"):
        (tmp_path / name).write_text("x\n")
        others.append(str(tmp_path / name))
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns as often as they can: the moment is short
    try:
        learn_paths_while_polling(str(rules), tuple(others))
    finally:
        sys.setswitchinterval(switch_interval)


def learn_paths_while_polling(rules: str, others: tuple[str, ...]) -> None:
    for _ in range(300):
        generations = []
        reloader = Reloader(rules, poll_interval=0, on_changed=lambda: generations.append(1))
        reloader.reload()  # the first generation starts; what it reads is not known yet
        polling = threading.Event()

        def poll() -> None:
            polling.set()
            for _ in range(200):
                reloader.reload_if_changed()

        watcher = threading.Thread(target=poll)
        watcher.start()
        polling.wait()
        reloader.watch(others)  # the leader's report
        watcher.join()
        assert generations == [1]
