"""A NodeProcess: a Node app process, which takes whole connections over Node's IPC channel.

See "Node" in ``docs/protocol/handoff.md``: the core hands over a connection with the bytes it
already read; the process reads and writes it from then on and reports when it closes. Balancing is
per connection, as in Node's cluster module.

A connector's connection carries requests for every app, so it cannot be handed over: for those
requests the process gets a connection of the core's own (one end of a socketpair) for one
request, and the core relays the response (``relay.py``).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import logging
import socket
import struct
from typing import TYPE_CHECKING, Any

import httptools

from appmanager.process import Process
from appmanager.relay import ResponseState, relay_response, send_request
from appmanager.session import Session
from appmanager.slots import ConnectionSlots

if TYPE_CHECKING:
    from appmanager.front import Connection
    from appmanager.group import Group
    from appmanager.output import OutputCapture
    from appmanager.request import Request

log = logging.getLogger("appmanager")

MAX_LINE = 1024 * 1024


class NodeProcess(Process):
    """A Node process: sessions are the connections it holds (no limit on how many)."""

    slots: ConnectionSlots

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
        self._queue: collections.deque[tuple[bytes, list[Any], socket.socket | None]] = (
            collections.deque()
        )
        self._writing = False
        # A byte per connection, from offset 0 (handoff.md, "Node").
        self.takes_connections = True
        self.slots = ConnectionSlots(progress_fd, 0, 1)
        # Requests relayed over a socketpair (connectors), by seq, until the shim reports
        # the socketpair closed.
        self._relays: dict[int, _Relay] = {}

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
        if session is None or seq in self._relays:
            return  # relayed requests are logged by the core, which saw them
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
        data = conn.with_buffered(data)
        slot = self.slots.take()
        line = self._conn_message(conn, seq, slot, data)
        try:
            self._send(line, conn.ancillary)
        except OSError as exc:
            log.warning("process %d: handoff failed: %s", self.pid, exc)
            self.slots.free(slot)
            self._lost_channel()
            return False
        self._slots[seq] = slot
        self.sessions[seq] = Session(seq, conn, self)
        conn.give_away()
        return True

    def handoff(self, conn: Connection, request: Request, keep_alive: bool) -> bool:
        """One request of a connector's connection: relayed over a socketpair (module
        docstring)."""
        self.seq += 1
        seq = self.seq
        slot = self.slots.take()
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", theirs.fileno()))]
        try:
            self._send(self._conn_message(conn, seq, slot, b""), ancillary, keep=theirs)
        except OSError as exc:
            log.warning("process %d: handoff failed: %s", self.pid, exc)
            ours.close()
            theirs.close()
            self.slots.free(slot)
            self._lost_channel()
            return False
        self._slots[seq] = slot
        session = Session(seq, conn, self, request.head)
        self.sessions[seq] = session
        relay = _Relay()
        relay.task = self._loop.create_task(self._relay(session, request, keep_alive, ours, relay))
        self._relays[seq] = relay
        return True

    async def _relay(
        self,
        session: Session,
        request: Request,
        keep_alive: bool,
        ours: socket.socket,
        relay: _Relay,
    ) -> None:
        conn = session.conn
        parser = httptools.HttpResponseParser(relay.state)
        relayed = keep = False
        try:
            await send_request(self._loop, ours, conn, request)
            relayed, keep, _ = await relay_response(
                self._loop, ours, conn, request, relay.state, parser
            )
        except OSError as exc:
            log.warning("process %d: relaying a request failed: %s", self.pid, exc)
        finally:
            request.discard()
            ours.close()
        if self.sessions.pop(session.seq, None) is None:
            return  # the process died meanwhile: _answer_lost answered
        status = parser.get_status_code() if relay.state.headers_done else None
        self.finish_relayed(
            session, request, relayed, keep and keep_alive, status, relay.state.body_bytes
        )

    def _conn_message(self, conn: Connection, seq: int, slot: int, data: bytes) -> bytes:
        """An APPMANAGER_CONN line: a connection, with the bytes already read from it."""
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
        return json.dumps(message, separators=(",", ":")).encode() + b"\n"

    def _send(self, line: bytes, ancillary: list[Any], keep: socket.socket | None = None) -> None:
        """Send ``line`` with a descriptor. A stream socket may take only part of a line; the
        descriptor travels with its first byte, so lines queue whole behind it. ``keep``, a
        socket of the core's own that the descriptor belongs to, is closed once it is sent."""
        if not self._queue:
            sent = self.ctl.sendmsg([line], ancillary)
            if keep is not None:
                keep.close()
            if sent == len(line):
                return
            self._queue.append((line[sent:], [], None))
        else:
            self._queue.append((line, ancillary, keep))
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self.ctl.fileno(), self._flush)

    def _flush(self) -> None:
        while self._queue:
            data, ancillary, keep = self._queue[0]
            try:
                sent = self.ctl.sendmsg([data], ancillary)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                for _data, _ancillary, owned in self._queue:
                    if owned is not None:
                        owned.close()
                self._queue.clear()
                break
            if keep is not None:
                keep.close()
            if sent < len(data):
                self._queue[0] = (data[sent:], [], None)
                return
            self._queue.popleft()
        self._writing = False
        self._loop.remove_writer(self.ctl.fileno())

    def _connection_closed(self, seq: int, returned: bytes | None = None) -> None:
        # Node never gives a connection back: ``returned`` is always None.
        slot = self._slots.pop(seq, None)
        if slot is not None:
            self.slots.free(slot)
        if self._relays.pop(seq, None) is not None:
            return  # a relayed request: its relay task finished the session
        session = self.sessions.pop(seq, None)
        if session is None:
            return
        self.processed += 1
        self.group.on_session_done(self, session, False)
        if self.state.name == "STOPPING" and not self.sessions:
            self._close_channel()

    def _answer_lost(self, sessions: list[Session]) -> None:
        """A connection whose request had arrived but whose response had not begun gets 502
        (its slot says so, or its relay had no response head yet); the others are closed."""
        connections = []
        for session in sessions:
            relay = self._relays.pop(session.seq, None)
            if relay is None:
                connections.append(session)
                continue
            self._slots.pop(session.seq, None)
            relay.task.cancel()
            started = relay.state.headers_done
            session.conn.on_process_lost(response_started=started, status=502)
            if not started:
                self.group.pool.log_access(session.conn, session.head, 502, 0)
        super()._answer_lost(connections)

    def _half_close_channel(self) -> None:
        """Node's channel is a stream that Node reads as a whole: closing it is how the shim is
        told to stop taking requests and to close its connections once idle (its reports are
        not needed: the core closes what it still holds when the process exits)."""
        self._close_channel()


class _Relay:
    """A request relayed over a socketpair: its task and what its response looked like."""

    __slots__ = ("task", "state")

    def __init__(self) -> None:
        self.task: asyncio.Task[None]
        self.state = ResponseState()


def _text(value: object) -> str | None:
    """A string field of an APPMANAGER_LOG message, cut to a sane length; None otherwise."""
    return value[:8192] if isinstance(value, str) else None
