"""The balancer: which process of a group gets the next request."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from appmanager.states import ProcessState

if TYPE_CHECKING:
    from appmanager.process import Process


def least_busy(processes: Iterable[Process]) -> Process | None:
    """The READY process with room for one more session and the fewest sessions for its
    concurrency; None when every process is busy. Ties go to the earlier process, so that at low
    load the same few processes stay warm and the others can be reaped."""
    best: Process | None = None
    best_load = 2.0
    for proc in processes:
        if proc.state is not ProcessState.READY:
            continue
        busy = len(proc.sessions)
        if proc.concurrency == 0 or proc.counts_connections:
            # Unlimited processes, and those that take connections, are compared by raw count,
            # after any idle limited one; one that said it is busy (S) takes none.
            if proc.busy:
                continue
            load = busy / (busy + 1)
        elif busy >= proc.concurrency:
            continue
        else:
            load = busy / proc.concurrency
        if load < best_load:
            best = proc
            best_load = load
            if load == 0.0:
                break
    return best
