"""The front: listening sockets and client connections.

The core reads each request whole (``request.py``), routes it to its app, and lends the connection's
descriptor to an app process until the process reports the response done (``process.py``). The core
is the only reader of a connection; an app process is its only writer while it holds a request.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
import time
from typing import TYPE_CHECKING

from appmanager import errors
from appmanager.connector import ConnectorError, client_meta, secret_matches
from appmanager.request import HttpError, RequestReader

if TYPE_CHECKING:
    from appmanager.core import Core
    from appmanager.group import Group

log = logging.getLogger("appmanager")

RECV_SIZE = 65536
# While a request is in flight, pipelined bytes are buffered up to this much before the core stops
# reading from the client.
MAX_PIPELINE_BUFFER = 1024 * 1024
LINGER = 2.0
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (SO_PEERCRED)


class Connection:
    """One client connection, from accept to close.

    Owned by the core for its whole life; while ``busy`` it has one request waiting in a Group's
    wait-list (``waiting`` is that Group) or being served by a Process (a Session refers to it).
    """

    __slots__ = (
        "core",
        "sock",
        "fd",
        "meta",
        "base_meta",
        "connector",
        "ancillary",
        "buf",
        "reader",
        "busy",
        "waiting",
        "group",
        "handed",
        "eof",
        "closed",
        "lingering",
        "paused",
        "last_active",
        "created",
        "served",
        "_out",
        "_close_after_write",
        "_loop",
    )

    def __init__(
        self, core: Core, sock: socket.socket, meta: bytes, connector: bool = False
    ) -> None:
        self.core = core
        self.sock = sock
        self.fd = sock.fileno()
        # The handoff's address fields for the current request: the socket's own, or a
        # connector's ``!~Client`` for this request.
        self.meta = self.base_meta = meta
        # A connection on the connector socket from an allowed peer: its ``!~`` fields count.
        self.connector = connector
        self.ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", self.fd))]
        self.buf = bytearray()
        self.reader: RequestReader | None = None
        self.busy = False
        self.waiting: Group | None = None
        self.group: Group | None = None
        self.handed = False
        self.eof = False
        self.closed = False
        self.lingering = 0.0
        self.paused = False
        self.last_active = self.created = time.monotonic()
        # Requests answered on this connection (a keep-alive connection that served some and
        # is idle may be closed at shutdown; a fresh one still owes its first request).
        self.served = 0
        self._out = b""
        self._close_after_write = False
        self._loop = core.loop
        self._loop.add_reader(self.fd, self._on_readable)

    # -- reading ---------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._on_eof()
            return
        self.last_active = time.monotonic()
        if self.lingering:
            return  # closing: discard what the client still sends
        self.buf += data
        if not self.busy:
            self._next_request()
        elif len(self.buf) > MAX_PIPELINE_BUFFER:
            self._loop.remove_reader(self.fd)
            self.paused = True

    def _next_request(self) -> None:
        """Read requests from the buffer until one is dispatched or more bytes are needed."""
        while self.buf and not self.busy and not self.closed:
            reader = self.reader
            if reader is None:
                reader = self.reader = RequestReader(self.core.spool_dir)
            try:
                if reader.request is None:
                    used = reader.read_head(self.buf)
                    if used:
                        del self.buf[:used]
                    if reader.request is None:
                        return
                    if not self._route(reader):
                        return
                used = reader.read_body(self.buf)
            except HttpError as exc:
                reader.close()
                self.reader = None
                log.info("refused a request with %d: %s", exc.status, exc.reason)
                self.respond(errors.simple_response(exc.status, exc.reason), close=True)
                return
            if used:
                del self.buf[:used]
            if not reader.complete:
                if reader.send_continue:
                    reader.send_continue = False
                    self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            self.reader = None
            self.busy = True
            group = self.group
            assert group is not None
            group.dispatch(self, reader.finish())

    def _route(self, reader: RequestReader) -> bool:
        """The head is in: find the app. False when the request was answered (no app) or the
        whole connection went to a process that takes connections (Node)."""
        request = reader.request
        assert request is not None
        if self.connector:
            return self._route_connector(reader)
        group = self.core.pool.find_group(request)
        if group is None:
            reader.close()
            self.reader = None
            self.core.pool.log_access(self, request.head, 404, None)
            # The body, if any, was not read: close rather than parse it as a next request.
            self.respond(
                errors.simple_response(404, "no app is configured for this host and path"),
                close=reader.has_body,
            )
            return False
        self.group = group
        if group.per_connection:
            # Hand over the raw bytes as the client sent them, and the connection with them.
            reader.close()
            self.reader = None
            data = request.head + bytes(self.buf)
            self.buf.clear()
            self.busy = True
            group.dispatch(self, data)
            return False
        return True

    def _route_connector(self, reader: RequestReader) -> bool:
        """Route by the connector's ``!~App`` (docs/protocol/connector.md); a request on the
        connector socket without it is routed like any other. Always one request at a time:
        the web server's connection carries requests for every app."""
        request = reader.request
        assert request is not None
        fields = request.connector or {}
        app = fields.get(b"!~app")
        trusted = app is not None and secret_matches(fields, self.core.connector_secret)
        client = fields.get(b"!~client") if trusted else None
        self.meta = (client_meta(client) if client else None) or self.base_meta
        if app is None:
            group = self.core.pool.find_group(request)
            reason = "no app is configured for this host and path"
            status = 404
        elif not trusted:
            # Only the web server that started the core (or was given its secret) may name apps.
            log.warning("refused a request with connector fields but without the core's secret")
            group = None
            reason = "connector fields without the core's secret"
            status = 403
        else:
            try:
                group = self.core.connector_apps.group_for(app)
            except ConnectorError as exc:
                group = None
                reason = f"cannot serve this app: {exc}"
                status = 500
        if group is None:
            reader.close()
            self.reader = None
            self.core.pool.log_access(self, request.head, status, None)
            self.respond(errors.simple_response(status, reason), close=reader.has_body)
            return False
        self.group = group
        return True

    def with_buffered(self, data: bytes) -> bytes:
        """``data`` (what was read of the connection for its handoff) followed by the bytes the
        client sent while the request waited for a process; they leave the buffer."""
        if self.buf:
            data += bytes(self.buf)
            self.buf.clear()
        return data

    def take_back(self, data: bytes) -> None:
        """A process that held this connection whole gave it back (``B``): read it again,
        ``data`` (what the process read and did not serve) first. The Group then finishes the
        session, which reads the next request."""
        self.handed = False
        if data:
            self.buf[:0] = data
        self.last_active = time.monotonic()
        if not self.eof and not self.closed and not self.paused:
            self._loop.add_reader(self.fd, self._on_readable)

    def give_away(self) -> None:
        """A process now reads this connection itself (upgrade, or a Node process): stop
        reading it; the core keeps its descriptor until the process is done with it."""
        self.handed = True
        self._loop.remove_reader(self.fd)

    def _on_eof(self) -> None:
        self.eof = True
        self._loop.remove_reader(self.fd)
        if self.waiting is not None:
            self.waiting.cancel_wait(self)
            self.waiting = None
            self.busy = False
        if not self.busy:
            self._close_now()
        # else: the process still writes the response; close when it is done.

    # -- responses -------------------------------------------------------------------------------

    def on_response_done(self, keep: bool) -> None:
        """The process finished the current request (``D`` message)."""
        self.busy = False
        self.served += 1
        self.last_active = time.monotonic()
        if self.handed:
            # The process read from the connection itself: nothing here is in sync any more.
            self._close_now()
            return
        if not keep or self.eof or self.core.stopping:
            self.close()
            return
        if self.paused:
            self.paused = False
            self._loop.add_reader(self.fd, self._on_readable)
        if self.buf:
            self._next_request()

    def on_process_lost(self, response_started: bool, status: int = 502) -> None:
        """The process serving this connection died mid-request (502), or was killed for taking
        too long (504)."""
        self.busy = False
        if response_started:
            self._close_now() if self.handed else self.close()
        elif status == 504:
            self.respond(errors.simple_response(504, "the app took too long"), close=True)
        else:
            self.respond(errors.simple_response(502, "the app process died"), close=True)

    def respond(self, data: bytes, *, close: bool = False) -> None:
        """Write a response of the core's own (an error page) and finish the current request."""
        self.busy = False
        self.served += 1
        self._write(data)
        if close or self.eof or self.core.stopping:
            if self._out:
                self._close_after_write = True
            else:
                self.close()
        elif self.buf:
            self._next_request()

    def _write(self, data: bytes) -> None:
        if self._out:
            self._out += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close_now()
            return
        if sent < len(data):
            self._out = data[sent:]
            self._loop.add_writer(self.fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_now()
            return
        self._out = self._out[sent:]
        if not self._out:
            self._loop.remove_writer(self.fd)
            if self._close_after_write:
                self.close()

    # -- closing ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close gracefully: send FIN, then discard what the client still sends for a moment,
        so that unread bytes do not make the kernel reset the connection and destroy a response
        the client has not read yet."""
        if self.closed or self.lingering:
            return
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.eof:
            self._close_now()
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close_now()
            return
        self.lingering = time.monotonic() + LINGER
        if self.paused:
            self.paused = False
            self._loop.add_reader(self.fd, self._on_readable)

    def _close_now(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.waiting is not None:
            self.waiting.cancel_wait(self)
            self.waiting = None
        self._loop.remove_reader(self.fd)
        if self._out:
            self._loop.remove_writer(self.fd)
        self.sock.close()
        self.core.connections.discard(self)

    def idle_between_requests(self) -> bool:
        """Has it served requests and holds no part of another (safe to close at shutdown)?"""
        return not self.busy and self.served > 0 and not self.buf and self.reader is None

    def sweep(self, now: float, idle_timeout: float, read_timeout: float) -> None:
        """Called about once a second: end lingering closes and idle or stalled connections."""
        if self.lingering:
            if now > self.lingering:
                self._close_now()
            return
        if self.busy:
            return
        idle = now - self.last_active
        if self.reader is not None and idle > read_timeout:
            self.respond(errors.simple_response(408, "request not received in time"), close=True)
        elif self.reader is None and idle > idle_timeout:
            self.close()


class Listener:
    """One listening socket (TCP or Unix); accepts connections for the core until closed."""

    def __init__(self, core: Core, sock: socket.socket, label: str) -> None:
        self.core = core
        self.sock = sock
        self.label = label
        self.unix = sock.family == socket.AF_UNIX
        self.allowed_uids = {0, os.geteuid()}
        if core.connector_uid is not None:
            self.allowed_uids.add(core.connector_uid)
        if self.unix:
            self._server = b"127.0.0.1 0"
        else:
            host, port = sock.getsockname()[:2]
            self._server = f"{host} {port}".encode()
        sock.setblocking(False)
        core.loop.add_reader(sock.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        # Accept a batch per wake-up: under load this keeps the accept queue short.
        for _ in range(64):
            try:
                conn_sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("cannot accept on %s: %s", self.label, exc.strerror)
                    return
                continue
            conn_sock.setblocking(False)
            if self.unix:
                if not self._allowed(conn_sock):
                    continue
                peer = b"127.0.0.1 0"
            else:
                conn_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = f"{addr[0]} {addr[1]}".encode()
            meta = peer + b" " + self._server + b" http"
            conn = Connection(self.core, conn_sock, meta, connector=self.unix)
            self.core.connections.add(conn)

    def _allowed(self, conn_sock: socket.socket) -> bool:
        """Is the peer the core's user, root or the connector user? Others are closed at once
        (the socket file is world-writable so that a web server's workers can connect)."""
        creds = conn_sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid, uid, _gid = _UCRED.unpack(creds)
        if uid in self.allowed_uids:
            return True
        log.warning(
            "refused a connection on %s from uid %d (pid %d): only the core's user, root and "
            "--connector-user may connect",
            self.label,
            uid,
            pid,
        )
        conn_sock.close()
        return False

    def close(self) -> None:
        """Stop listening. Connections the kernel already completed are taken first: their
        clients were accepted and are served (their responses close the connection)."""
        self.core.loop.remove_reader(self.sock.fileno())
        for _ in range(1024):
            before = len(self.core.connections)
            self._on_accept()
            if len(self.core.connections) == before:
                break
        self.sock.close()


def listen_tcp(address: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket; raises OSError with the reason when the address cannot be used."""
    infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def listen_unix(path: str, backlog: int = 1024) -> socket.socket:
    """A listening Unix socket at ``path``, replacing a stale socket file left there."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # nobody listens: a leftover of a core that died
            else:
                raise OSError(errno.EADDRINUSE, "another server listens on it")
            finally:
                probe.close()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Anyone may connect; the listener serves only allowed peers (Listener._allowed).
        os.chmod(path, 0o666)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock
