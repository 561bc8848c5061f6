"""A ProxyProcess: a generic app (any program listening on ``$PORT``), reached by proxying.

This is the fallback data path, for programs that cannot take a descriptor: the core sends each
request to the app's port over a pooled keep-alive connection and relays the response bytes back,
unchanged, to the client (``relay.py``). It copies bytes, so it is slower than the handoff; it is
kept correct and lean rather than fast.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from typing import TYPE_CHECKING

import httptools

from appmanager.process import Process
from appmanager.relay import ResponseState, relay_response, send_request
from appmanager.session import Session
from appmanager.states import ProcessState, transition

if TYPE_CHECKING:
    from appmanager.front import Connection
    from appmanager.group import Group
    from appmanager.output import OutputCapture
    from appmanager.request import Request

log = logging.getLogger("appmanager")

MAX_IDLE = 16
STOP_GRACE = 10.0


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
        state = ResponseState()
        parser = httptools.HttpResponseParser(state)
        try:
            upstream = await self._upstream()
            await send_request(self._loop, upstream, conn, request)
            relayed, keep, upstream_keep = await relay_response(
                self._loop, upstream, conn, request, state, parser
            )
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
        status = parser.get_status_code() if state.headers_done else None
        self.finish_relayed(session, request, relayed, keep, status, state.body_bytes)

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
