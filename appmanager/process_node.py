"""A NodeProcess: a Node app process, which takes whole connections over Node's IPC channel.

See "Node" in ``docs/protocol/handoff.md``: the core hands over a connection with the bytes it
already read; the process reads and writes it from then on and reports when it closes. Balancing is
per connection, as in Node's cluster module.
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from appmanager.process import Process
from appmanager.session import Session

if TYPE_CHECKING:
    import asyncio

    from appmanager.front import Connection
    from appmanager.group import Group
    from appmanager.output import OutputCapture

log = logging.getLogger("appmanager")

MAX_LINE = 1024 * 1024


class NodeProcess(Process):
    """A Node process: sessions are the connections it holds (no limit on how many)."""

    def __init__(
        self,
        group: Group,
        pid: int,
        ctl: socket.socket,
        progress_fd: int,
        pidfd: int,
        output: OutputCapture,
    ) -> None:
        super().__init__(group, pid, ctl, progress_fd, pidfd, output, concurrency=0)
        self._in = bytearray()
        self._queue: collections.deque[tuple[bytes, list[Any]]] = collections.deque()
        self._writing = False
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._slots: dict[int, int] = {}  # seq -> slot

    # -- the channel ---------------------------------------------------------------------------

    async def read_line(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes | None:
        """The first line the process sends (its answer to APPMANAGER_SPAWN), or None at EOF."""
        fut: asyncio.Future[bytes | None] = loop.create_future()

        def readable() -> None:
            line = self._read_lines(first_only=True)
            if line is not None and not fut.done():
                fut.set_result(line or None)

        loop.add_reader(sock.fileno(), readable)
        try:
            return await fut
        finally:
            loop.remove_reader(sock.fileno())

    def _read_lines(self, first_only: bool = False) -> bytes | None:
        """Read what is available; with ``first_only`` return the first whole line (b"" at EOF),
        otherwise handle every whole line as a message."""
        try:
            data = self.ctl.recv(65536)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        if not data:
            if first_only:
                return b""
            self._lost_channel()
            return None
        self._in += data
        while True:
            end = self._in.find(b"\n")
            if end < 0:
                if len(self._in) > MAX_LINE:
                    log.error("process %d sent an over-long message", self.pid)
                    self._in.clear()
                return None
            line = bytes(self._in[:end])
            del self._in[: end + 1]
            if first_only:
                return line
            self._on_message(line)

    def _on_control(self) -> None:
        self._read_lines()

    def _on_message(self, line: bytes) -> None:
        try:
            message: dict[str, Any] = json.loads(line)
        except ValueError:
            log.error("process %d sent invalid JSON %r", self.pid, line[:80])
            return
        cmd = message.get("cmd")
        if cmd == "APPMANAGER_CLOSED":
            self._connection_closed(int(message.get("seq", -1)))
        elif cmd == "APPMANAGER_LOG":
            self._log_access(message)
        elif cmd == "NODE_HANDLE_ACK":
            pass  # Node acknowledges every descriptor it receives
        elif cmd == "NODE_HANDLE_NACK":
            log.error("process %d could not take a connection", self.pid)
        else:
            log.debug("process %d sent %r", self.pid, line[:80])

    def _log_access(self, message: dict[str, Any]) -> None:
        """APPMANAGER_LOG: a response finished on one of the process's connections (sent only
        when SPAWN asked for it, ``access_log``); the line goes to the access log."""
        seq = message.get("seq")
        session = self.sessions.get(seq) if isinstance(seq, int) else None
        if session is None:
            return
        status = message.get("status")
        size = message.get("bytes")
        self.group.pool.log_access_line(
            session.conn,
            _text(message.get("request")) or "-",
            status if type(status) is int and 100 <= status <= 999 else None,
            size if type(size) is int and size >= 0 else None,
            _text(message.get("referer")),
            _text(message.get("user_agent")),
        )

    # -- connections ---------------------------------------------------------------------------

    def handoff_connection(self, conn: Connection, data: bytes) -> bool:
        """Give the whole connection to the process, with the bytes already read from it."""
        self.seq += 1
        seq = self.seq
        slot = self._take_slot()
        remote_addr, remote_port, server_addr, server_port, scheme = conn.meta.decode().split()
        message = {
            "cmd": "NODE_HANDLE",
            "type": "net.Socket",
            "msg": {
                "cmd": "APPMANAGER_CONN",
                "seq": seq,
                "slot": slot,
                "data": base64.b64encode(data).decode(),
                "remote_addr": remote_addr,
                "remote_port": int(remote_port),
                "server_addr": server_addr,
                "server_port": int(server_port),
                "scheme": scheme,
            },
            "key": None,
        }
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        try:
            self._send(line, conn)
        except OSError as exc:
            log.warning("process %d: handoff failed: %s", self.pid, exc)
            self._free_slots.append(slot)
            self._lost_channel()
            return False
        self._slots[seq] = slot
        self.sessions[seq] = Session(seq, conn, self)
        conn.give_away()
        return True

    def _send(self, line: bytes, conn: Connection) -> None:
        """Send ``line`` with the connection's descriptor. A stream socket may take only part of
        a line; the descriptor travels with its first byte, so lines queue whole behind it."""
        if not self._queue:
            sent = self.ctl.sendmsg([line], conn.ancillary)
            if sent == len(line):
                return
            self._queue.append((line[sent:], []))
        else:
            self._queue.append((line, conn.ancillary))
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self.ctl.fileno(), self._flush)

    def _flush(self) -> None:
        while self._queue:
            data, ancillary = self._queue[0]
            try:
                sent = self.ctl.sendmsg([data], ancillary)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._queue.clear()
                break
            if sent < len(data):
                self._queue[0] = (data[sent:], [])
                return
            self._queue.popleft()
        self._writing = False
        self._loop.remove_writer(self.ctl.fileno())

    def _take_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        slot = self._next_slot
        self._next_slot += 1
        return slot

    def _connection_closed(self, seq: int) -> None:
        session = self.sessions.pop(seq, None)
        slot = self._slots.pop(seq, None)
        if slot is not None:
            self._free_slots.append(slot)
        if session is None:
            return
        self.processed += 1
        self.group.on_session_done(self, session, False)
        if self.state.name == "STOPPING" and not self.sessions:
            self._close_channel()

    def _answer_lost(self, sessions: list[Session]) -> None:
        """A connection whose request had arrived but whose response had not begun gets 502;
        the others are closed."""
        for session in sessions:
            slot = self._slots.pop(session.seq, None)
            state = b""
            if slot is not None:
                try:
                    state = os.pread(self.progress_fd, 1, slot)
                except OSError:
                    pass
            session.conn.on_process_lost(response_started=state != b"\x01", status=502)

    def stop(self) -> None:
        """Node keeps connections open between requests: closing the channel asks the shim to
        stop taking requests and close them once idle."""
        super().stop()
        if self.sessions:
            self._close_channel()


def _text(value: object) -> str | None:
    """A string field of an APPMANAGER_LOG message, cut to a sane length; None otherwise."""
    return value[:8192] if isinstance(value, str) else None
