"""The slots of a progress file: one per connection a process holds whole (``handoff.md``).

A process that takes whole connections (Node, ASGI) keeps, for each, a small state in its progress
file, at the offset of the slot the core gave the connection. The core reads it only when the
process dies (502 for a request that had arrived and had no response yet) and, for ASGI, once a
second to time requests (``max_request_time``).
"""

from __future__ import annotations

import os
import struct

_U64 = struct.Struct("<Q")


class ConnectionSlots:
    """The slots of one process's progress file: ``width`` bytes each (1 for Node, an 8-byte
    little-endian word for ASGI) from ``base``. Lives as long as its Process; a slot is the
    connection's from handoff until the process reports it closed, then free for the next."""

    __slots__ = ("fd", "base", "width", "_free", "_next")

    def __init__(self, fd: int, base: int, width: int) -> None:
        self.fd = fd
        self.base = base
        self.width = width
        self._free: list[int] = []
        self._next = 0

    def take(self) -> int:
        if self._free:
            return self._free.pop()
        slot = self._next
        self._next += 1
        return slot

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def read(self, slot: int) -> int:
        """The slot's value; 0 (idle) when it cannot be read."""
        try:
            data = os.pread(self.fd, self.width, self.base + slot * self.width)
        except OSError:
            return 0
        if len(data) != self.width:
            return 0
        return data[0] if self.width == 1 else int(_U64.unpack(data)[0])

    def write(self, slot: int, value: int) -> None:
        """Set the slot before the process has the connection (an 8-byte slot only)."""
        try:
            os.pwrite(self.fd, _U64.pack(value), self.base + slot * self.width)
        except OSError:
            pass
