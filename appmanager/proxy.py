"""A ProxyProcess: a generic app (any program listening on ``$PORT``), reached by proxying.

This is the fallback data path, for programs that cannot take a descriptor: the core sends each
request to the app's port over a pooled keep-alive connection and relays the response bytes back,
unchanged, to the client. It copies bytes, so it is slower than the handoff; it is kept correct and
lean rather than fast.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING

import httptools

from appmanager import errors
from appmanager.process import Process
from appmanager.session import Session
from appmanager.states import ProcessState, transition

if TYPE_CHECKING:
    from appmanager.front import Connection
    from appmanager.group import Group
    from appmanager.output import OutputCapture
    from appmanager.request import Request

log = logging.getLogger("appmanager")

# Request headers the core sets itself on the way to the app.
_DROP = frozenset(
    (b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"expect", b"te")
)
_FORWARDED = frozenset((b"x-forwarded-for", b"x-forwarded-proto"))
MAX_IDLE = 16
STOP_GRACE = 10.0


class _ResponseState:
    """What httptools reports about the app's response."""

    __slots__ = ("headers_done", "complete", "connection", "body_bytes")

    def __init__(self) -> None:
        self.headers_done = False
        self.complete = False
        self.connection = b""
        self.body_bytes = 0

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"connection":
            self.connection += b"," + value.lower()

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_message_complete(self) -> None:
        self.complete = True


class ProxyProcess(Process):
    """A generic app's process: no control channel, no shim; requests go to its port.

    Lives like any Process; besides it owns a small pool of idle keep-alive connections to the app,
    closed when the process stops.
    """

    def __init__(
        self, group: Group, pid: int, pidfd: int, output: OutputCapture, port: int
    ) -> None:
        # Generic apps have no control channel: a closed placeholder keeps the base class simple.
        placeholder = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        placeholder.close()
        super().__init__(group, pid, placeholder, -1, pidfd, output, concurrency=0)
        self.port = port
        self._idle: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def port_open(self) -> bool:
        """Does the app accept connections on its port yet?"""
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await self._loop.sock_connect(sock, ("127.0.0.1", self.port))
        except OSError:
            return False
        finally:
            sock.close()
        return True

    def start_serving(self) -> None:
        self._loop.add_reader(self.pidfd, self._on_exit)
        transition(self, ProcessState.READY)  # SPAWNING -> READY

    def _close_channel(self) -> None:
        """A generic app is told to stop with TERM (it knows no control channel); KILL follows."""
        for sock in self._idle:
            sock.close()
        self._idle.clear()
        if self._kill_timer is None and self.state is not ProcessState.EXITED:
            self.signal(signal.SIGTERM)
            self._kill_timer = self._loop.call_later(STOP_GRACE, self._kill)

    def _answer_lost(self, sessions: list[Session]) -> None:
        """Each proxied request notices the dead app itself (its upstream connection fails) and
        answers 502 or closes; nothing to do here."""

    def handoff(self, conn: Connection, request: Request, keep_alive: bool) -> bool:
        self.seq += 1
        session = Session(self.seq, conn, self)
        self.sessions[self.seq] = session
        session.head = request.head
        task = self._loop.create_task(self._proxy(session, request, keep_alive))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _proxy(self, session: Session, request: Request, keep_alive: bool) -> None:
        conn = session.conn
        relayed = False
        keep = False
        upstream: socket.socket | None = None
        state = _ResponseState()
        parser = httptools.HttpResponseParser(state)
        try:
            upstream = await self._upstream()
            await self._send_request(upstream, conn, request)
            relayed, keep, upstream_keep = await self._relay(upstream, conn, request, state, parser)
            keep = keep and keep_alive
            if upstream_keep and len(self._idle) < MAX_IDLE and self.state is ProcessState.READY:
                self._idle.append(upstream)
                upstream = None
        except OSError as exc:
            log.warning("app %s: proxying to port %d failed: %s", self.group.name, self.port, exc)
        finally:
            request.discard()
            if upstream is not None:
                upstream.close()
        self.sessions.pop(session.seq, None)
        if relayed:
            self.processed += 1
            status = parser.get_status_code() if state.headers_done else None
            self.group.on_session_done(self, session, keep, status, state.body_bytes)
        else:
            conn.respond(errors.simple_response(502, "the app did not answer"), close=True)
            self.group.pool.log_access(conn, request.head, 502, None)
            self.group.serve_waiting(self)
        if self.state is ProcessState.STOPPING and not self.sessions:
            self._close_channel()

    async def _upstream(self) -> socket.socket:
        while self._idle:
            sock = self._idle.pop()
            # An idle connection the app closed reads as EOF: skip it.
            try:
                if sock.recv(1, socket.MSG_PEEK) == b"":
                    sock.close()
                    continue
            except BlockingIOError:
                return sock
            except OSError:
                sock.close()
                continue
            return sock
        sock = socket.socket()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await self._loop.sock_connect(sock, ("127.0.0.1", self.port))
        except OSError:
            sock.close()
            raise
        return sock

    async def _send_request(
        self, upstream: socket.socket, conn: Connection, request: Request
    ) -> None:
        lines = request.head.split(b"\r\n")
        out = [lines[0]]
        for line in lines[1:]:
            if not line:
                continue
            name = line.split(b":", 1)[0].strip().lower()
            if name not in _DROP and name not in _FORWARDED:
                out.append(line)
        remote = conn.meta.split(b" ", 1)[0]
        out.append(b"X-Forwarded-For: " + remote)
        out.append(b"X-Forwarded-Proto: http")
        if request.body_len or request.method not in (b"GET", b"HEAD", b"DELETE", b"OPTIONS"):
            out.append(b"Content-Length: %d" % request.body_len)
        out.append(b"Connection: keep-alive")
        head = b"\r\n".join(out) + b"\r\n\r\n"
        if request.body_file is None:
            await self._loop.sock_sendall(upstream, head + request.body)
            return
        await self._loop.sock_sendall(upstream, head)
        fd = request.body_file.fileno()
        offset = 0
        while offset < request.body_len:
            chunk = os.pread(fd, 256 * 1024, offset)
            if not chunk:
                break
            await self._loop.sock_sendall(upstream, chunk)
            offset += len(chunk)

    async def _relay(
        self,
        upstream: socket.socket,
        conn: Connection,
        request: Request,
        state: _ResponseState,
        parser: httptools.HttpResponseParser,
    ) -> tuple[bool, bool, bool]:
        """Copy the app's response to the client. Returns (anything relayed, the client
        connection may stay open, the upstream connection may be reused)."""
        head_only = request.method == b"HEAD"
        relayed = False
        head_buf = b""
        while True:
            data = await self._loop.sock_recv(upstream, 65536)
            if not data:
                # Close-delimited response, or the app died.
                if state.headers_done:
                    return True, False, False
                if relayed:
                    return True, False, False
                raise ConnectionError("the app closed the connection without answering")
            if head_only and not state.headers_done:
                head_buf += data
                end = head_buf.find(b"\r\n\r\n")
                if end >= 0:
                    await self._loop.sock_sendall(conn.sock, head_buf[: end + 4])
                    try:
                        parser.feed_data(head_buf[: end + 4])
                    except httptools.HttpParserError:
                        pass
                    return True, request.keep_alive, False
                continue
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise ConnectionError(f"malformed response from the app: {exc}") from None
            await self._loop.sock_sendall(conn.sock, data)
            relayed = True
            if state.complete:
                # The response ended before EOF, so it was length-delimited; the app's Connection
                # header decides (RFC 9112 9.3; httptools' should_keep_alive() is not reliable
                # once a message is complete).
                tokens = {t.strip() for t in state.connection.split(b",")}
                if parser.get_http_version() == "1.1":
                    keep = b"close" not in tokens
                else:
                    keep = b"keep-alive" in tokens
                return True, keep and request.keep_alive, keep
