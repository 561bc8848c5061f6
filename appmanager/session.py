"""A Session: one request (or one whole connection) checked out to one Process."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appmanager.front import Connection
    from appmanager.process import Process


class Session:
    """One request in flight on one Process, or one whole connection a Process holds.

    Lives from the handoff until the process reports the request done (the connection closed) or
    dies. The Connection it serves outlives it (keep-alive); so does the Process.
    """

    __slots__ = ("seq", "conn", "process", "started", "head", "mark")

    def __init__(self, seq: int, conn: Connection, process: Process, head: bytes = b"") -> None:
        self.seq = seq
        self.conn = conn
        self.process = process
        self.started = time.monotonic()
        # The request head, kept for the access log (a reference, not a copy); empty for a
        # whole connection, whose requests the process reads itself.
        self.head = head
        # A whole connection: the value of its slot when ``started`` was last set, so that the
        # reaper times each of its requests from when it first saw it (Process.oldest_request).
        self.mark = -1

    def verify_invariants(self) -> None:
        assert self.process.sessions.get(self.seq) is self
        assert self.conn.busy
