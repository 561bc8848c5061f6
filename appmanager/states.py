"""The life states of a Process, and the one function that changes them.

Every transition is logged as a fixed line, ``process 1234 entered READY``, that tests match.
"""

from __future__ import annotations

import enum
import logging
from typing import Protocol

log = logging.getLogger("appmanager")


class ProcessState(enum.Enum):
    """Where a Process is in its life."""

    SPAWNING = "SPAWNING"  # exec'd, handshake not finished
    READY = "READY"  # takes requests
    STOPPING = "STOPPING"  # takes no new requests; finishes what it has, then is stopped
    EXITED = "EXITED"  # the OS process is gone (reaped)


_ALLOWED: dict[ProcessState, frozenset[ProcessState]] = {
    # SPAWNING -> READY, or straight to STOPPING/EXITED when the spawn fails
    ProcessState.READY: frozenset({ProcessState.SPAWNING}),
    # READY -> STOPPING when retired or shut down; SPAWNING -> STOPPING when a spawn is abandoned
    ProcessState.STOPPING: frozenset({ProcessState.SPAWNING, ProcessState.READY}),
    # any live state -> EXITED when the OS process is reaped
    ProcessState.EXITED: frozenset(
        {ProcessState.SPAWNING, ProcessState.READY, ProcessState.STOPPING}
    ),
}


class HasState(Protocol):
    pid: int
    state: ProcessState


def transition(proc: HasState, new: ProcessState) -> None:
    """Move ``proc`` to ``new``, asserting the move is allowed, and log the fixed line."""
    assert proc.state in _ALLOWED[new], f"process {proc.pid}: {proc.state.name} -> {new.name}"
    proc.state = new
    log.info("process %d entered %s", proc.pid, new.name)
