"""bootrules.pid: the process ID the request path reads instead of asking the kernel."""

from __future__ import annotations

import os

from bootrules import pid


def test_a_forked_child_knows_its_own_pid_and_the_parent_keeps_its_own():
    """The recorder and the metrics start afresh in a forked worker only if its pid reads
    as new there: a stale parent's pid would write a worker's counts into the parent's file."""
    assert pid.current == os.getpid()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's verdict is its exit code
        os._exit(0 if pid.current == os.getpid() != os.getppid() else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pid.current == os.getpid()
