"""Whole client connections for the ASGI server: HTTP/1.1 that the process reads and writes itself.

A ``C`` message (handoff.md, "Whole connections") hands over a client connection with the bytes
the core already read from it, which hold at least one request head. From then on the process is
the connection's only reader and writer, as a server without a core would be: it parses every
request on it (``appmanager_python_httpparse.py``: httptools when the app's Python has it, a
pure-Python parser otherwise), serves them one at a time in order (keep-alive, pipelining),
streams request bodies to the app as they arrive (chunked ones de-chunked; ``Expect:
100-continue`` answered when the app first asks for the body), refuses what the core would refuse
(400, 408, 413, 417, 431, 501), upgrades to WebSocket, and closes the connection when a response
says so, and when the client stays quiet between requests (75 s) or stalls inside one (60 s). When
the process stops it gives the connection back to the core instead, between requests. It keeps the
connection's slot of the progress file, and reports on the control channel: ``X`` when the
connection is closed, ``B`` when it is given back, ``N`` as requests add up, and, when the core
keeps an access log, ``L`` for each response.

Unlike a request handed over with ``Q``, the process reads the client here, so an app also hears
``http.disconnect`` when the client goes away before its request body is complete.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
import struct
import sys
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Run as a script, the shim imports its modules from its own directory; mypy, run from the
    # repository root, knows them by their package path.
    from spawners.python import appmanager_python_asgi as asgi
    from spawners.python import appmanager_python_handoff as handoff
    from spawners.python import appmanager_python_httpparse as httpparse
    from spawners.python import appmanager_python_websocket as websocket
else:
    import appmanager_python_asgi as asgi
    import appmanager_python_handoff as handoff
    import appmanager_python_httpparse as httpparse
    import appmanager_python_websocket as websocket

Message = dict[str, Any]

# The core's limits (appmanager/request.py), applied to every request after the first, whose head
# the core read itself.
MAX_HEAD = 8 * 1024
MAX_BODY = 1024 * 1024 * 1024
READ_SIZE = 64 * 1024
# Request body bytes read but not yet received by the app, and requests parsed but not yet
# served, past which the connection stops reading until the app catches up.
HIGH_WATER = 1024 * 1024
MAX_PIPELINE = 16
# The core's timeouts (appmanager/core.py): a connection quiet between requests is closed; one
# that stalls inside a request head gets 408. Counted in ticks of the worker's sweep (seconds).
IDLE_TIMEOUT = 75
READ_TIMEOUT = 60
# How long a closed connection goes on discarding what the client still sends, so that unread
# bytes do not make the kernel reset it and destroy a response the client has not read yet.
LINGER = 2.0
# Requests counted before an N message reports them (fewer when max_requests is small).
REPORT_EVERY = 100
# An L message's request line, referer and user agent are cut to this many bytes.
MAX_LOG_FIELD = 8192

# A connection's slot of the progress file: the number of the request it concerns, shifted left
# by two, and one of these states (handoff.md). When the process dies the core answers 502 on the
# connections whose slot says RECEIVED and closes the others.
IDLE = 0
RECEIVED = 1
RESPONDING = 2

_CONNECT = b"CONNECT"
_BODY_REQUEST_HEADERS = frozenset((b"content-length", b"transfer-encoding"))
_NOTED = frozenset((b"content-length", b"transfer-encoding", b"expect", b"connection", b"upgrade"))
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_pack_slot = struct.Struct("<Q").pack

ClientDisconnected = handoff.ClientDisconnected
ProtocolError = handoff.ProtocolError
log = handoff.log
_PARSE_ERRORS = httpparse.PARSE_ERRORS
_UPGRADES = httpparse.UPGRADES


class ProgressSlots:
    """The connections' slots of the progress file: a little-endian 64-bit word per slot after the
    8 bytes that hold the ``Q`` path's seq (handoff.md).

    Written through a shared mapping of the file, which costs no system call; a slot beyond the
    file's size when the process started (or any slot on a big-endian machine) is written with
    ``pwrite``. Lives as long as the process.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        size = os.fstat(fd).st_size
        self.count = (size - 8) // 8 if size > 8 and sys.byteorder == "little" else 0
        self.words: memoryview | None = None
        if self.count:
            # Never unmapped: the view pins it, and both last as long as the process.
            mapping = mmap.mmap(fd, 8 + 8 * self.count)
            self.words = memoryview(mapping)[8:].cast("Q")

    def set(self, slot: int, value: int) -> None:
        if slot < self.count:
            assert self.words is not None
            self.words[slot] = value
        else:
            os.pwrite(self.fd, _pack_slot(value), 8 + 8 * slot)


def read_connection(
    worker: asgi.Worker,
    buffer: bytearray,
    view: memoryview,
    nbytes: int,
    msg_flags: int,
    fds: list[int],
) -> tuple[int, int, int, tuple[str, int], tuple[str, int], str, bytes]:
    """Reads the ``C`` message in ``buffer``'s first ``nbytes``, received with ``fds``: the
    arguments of its HttpConnection after the worker (seq, slot, descriptor, client, server,
    scheme, the bytes already read). Raises ProtocolError; the caller closes ``fds`` then."""
    if msg_flags & handoff.TRUNCATED:
        raise ProtocolError("message or its descriptors truncated")
    line_end = buffer.find(b"\n", 0, nbytes)
    fields = bytes(view[: max(line_end, 0)]).split(b" ")
    if line_end < 0 or len(fields) != 10 or fields[0] != b"C":
        raise ProtocolError(f"expected 10 fields in a C line, got {bytes(view[:80])!r}")
    _, seq_s, slot_s, flags, raddr, rport, saddr, sport, scheme, length_s = fields
    try:
        seq, slot, length = int(seq_s), int(slot_s), int(length_s)
        client = (raddr.decode(), int(rport))
        server = worker.servers.get(saddr + sport) or worker.server_address(saddr, sport)
    except ValueError:
        raise ProtocolError(f"unreadable numbers in {b' '.join(fields)!r}") from None
    in_file = b"F" in flags
    start = line_end + 1
    if nbytes - start != (0 if in_file else length) or len(fds) != (2 if in_file else 1):
        raise ProtocolError(f"{nbytes} bytes and {len(fds)} fds do not match the C line")
    if in_file:
        data = b""
        while len(data) < length:
            piece = os.pread(fds[1], length - len(data), len(data))
            if not piece:
                raise ProtocolError("the C message's file is shorter than it says")
            data += piece
        os.close(fds.pop())
    else:
        data = bytes(view[start:nbytes])
    return seq, slot, fds[0], client, server, scheme.decode("latin-1"), data


class HttpConnection:
    """One client connection handed over whole, from its ``C`` message until it is closed.

    Owns the descriptor (the core keeps a copy only to answer 502 should the process die) and
    one ClientWriter for its life. Parses requests into cycles and runs them one at a time in
    order: ``active`` is the one running, ``pipeline`` those parsed and waiting, ``receiving`` the
    one whose body is still arriving (the active one or the last waiting one). Invariants: the
    descriptor is closed only once no cycle runs (a task the app left behind could otherwise write
    to a number that names another connection by then); ``X`` goes out once, after the slot says
    IDLE; once ``closing``, no request is parsed any more.
    """

    __slots__ = (
        "worker",
        "loop",
        "seq",
        "slot",
        "fd",
        "client",
        "server",
        "scheme",
        "writer",
        "parser",
        "requests",
        "active",
        "pipeline",
        "receiving",
        "buffered",
        "reading",
        "eof",
        "closing",
        "lingering",
        "done",
        "starting",
        "linger_timer",
        "last_read",
        "in_head",
        "head_size",
        "head_partial",
        "url",
        "headers",
        "content_length",
        "codings",
        "expect",
        "connection",
        "upgrade",
    )

    def __init__(
        self,
        worker: asgi.Worker,
        seq: int,
        slot: int,
        fd: int,
        client: tuple[str, int],
        server: tuple[str, int],
        scheme: str,
        data: bytes,
    ) -> None:
        self.worker = worker
        self.loop = worker.loop
        self.seq = seq
        self.slot = slot
        self.fd = fd
        self.client = client
        self.server = server
        self.scheme = scheme
        self.writer = asgi.ClientWriter(fd, worker.loop)
        self.parser = httpparse.new_parser(self)
        # Requests begun on this connection; each cycle has its number.
        self.requests = 0
        self.active: ConnectionCycle | ConnectionWebSocket | None = None
        self.pipeline: deque[ConnectionCycle | ConnectionWebSocket] = deque()
        self.receiving: ConnectionCycle | None = None
        self.buffered = 0
        self.reading = False
        self.eof = False
        self.closing = False
        self.lingering = False
        self.done = False
        # run_next is starting requests (a request that ends at once asks for the next).
        self.starting = False
        self.linger_timer: asyncio.TimerHandle | None = None
        self.last_read = worker.tick
        # The head being parsed (between on_message_begin and on_headers_complete).
        self.in_head = False
        self.head_size = 0
        self.head_partial = 0
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: bytes | None = None
        self.codings: bytes | None = None
        self.expect: bytes | None = None
        self.connection = b""
        self.upgrade = b""
        worker.add_connection(self)
        self.start_reading()
        self.feed(data)

    # -- reading ---------------------------------------------------------------------------------

    def start_reading(self) -> None:
        if not self.reading and not self.done:
            self.reading = True
            # Quiet time counts from here: while paused, the client was not the one waited for.
            self.last_read = self.worker.tick
            self.loop.add_reader(self.fd, self.on_readable)

    def pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)

    def on_readable(self) -> None:
        worker = self.worker
        try:
            nbytes = os.readv(self.fd, worker.read_buffers)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            nbytes = -1  # reset by the client
        if nbytes <= 0:
            self.read_ended(reset=nbytes < 0)
            return
        self.last_read = worker.tick
        if self.closing:
            return  # closed or lingering: what the client still sends is discarded
        self.feed(worker.read_view[:nbytes])

    def feed(self, data: bytes | memoryview) -> None:
        """Parses what the client sent, then starts the next request if none runs."""
        try:
            self.parser.feed_data(data)
        except _UPGRADES as exc:
            self.switch_protocols(bytes(data[exc.args[0] :]))
        except _PARSE_ERRORS as exc:
            self.malformed(exc)
        else:
            if self.in_head and not self.closing:
                # A head that is still incomplete: every byte of a chunk that began inside it is
                # part of it; the one where it began (-1) holds at most the whole chunk.
                if self.head_partial < 0:
                    self.head_partial = 0
                else:
                    self.head_partial += len(data)
                if self.head_partial > MAX_HEAD:
                    self.refuse(431, "request header section too large")
            elif self.buffered > HIGH_WATER or len(self.pipeline) > MAX_PIPELINE:
                self.pause_reading()
        if self.active is None and self.pipeline:
            self.run_next()

    def read_ended(self, reset: bool) -> None:
        """EOF (the client closed, or half-closed, its side) or a reset."""
        self.eof = True
        self.pause_reading()
        if self.lingering:
            self.finish()
            return
        if self.receiving is not None:
            # A request whose body will never be complete.
            self.receiving.client_gone()
            self.receiving = None
            self.closing = True
        if reset and self.active is not None:
            self.active.client_gone()
        if self.active is None:
            if self.pipeline and not reset:
                self.run_next()  # parsed requests are answered even after a half-close
            else:
                self.finish()

    def want_body(self) -> None:
        """The app waits for body bytes: read again if buffering had stopped it."""
        if not self.reading and not self.closing and not self.eof:
            self.start_reading()

    def taken(self, size: int) -> None:
        """The app received ``size`` body bytes."""
        self.buffered -= size
        if (
            not self.reading
            and self.buffered <= HIGH_WATER // 4
            and not (self.closing or self.eof)
            and len(self.pipeline) <= MAX_PIPELINE
        ):
            self.start_reading()

    # -- the parser's callbacks (httptools' names) ---------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_size = 0
        self.head_partial = -1  # began in the chunk being parsed
        self.url = b""
        self.headers = []
        self.content_length = self.codings = self.expect = None
        self.connection = self.upgrade = b""

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # a trailer field after a chunked body: not passed on
        name = name.lower()
        value = value.strip()
        self.head_size += len(name) + len(value) + 4
        if name in _NOTED:
            if name == b"content-length":
                self.content_length = value
            elif name == b"transfer-encoding":
                self.codings = value if self.codings is None else self.codings + b"," + value
            elif name == b"expect":
                self.expect = value
            elif name == b"connection":
                self.connection = self.connection + b"," + value if self.connection else value
            else:
                self.upgrade = value
        elif name[:2] == b"!~":
            return  # a connector's field: the core drops them on every connection, and so here
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.closing:
            return
        self.requests += 1
        parser = self.parser
        method = parser.get_method()
        problem = self.problem(method)
        if problem is not None:
            self.refuse(*problem)
            return
        version = parser.get_http_version()
        http11 = version == "1.1"
        client_close = client_keepalive = False
        if self.connection:
            client_close, client_keepalive = handoff.connection_tokens(
                self.connection.decode("latin-1")
            )
        # Stopping or not: a connection that may stay open goes back to the core after this.
        keep_alive = not client_close and (http11 or client_keepalive)
        url = self.url
        worker = self.worker
        upgrading = parser.should_upgrade() or method == _CONNECT
        if upgrading and self.upgrade.lower() == b"websocket":
            scope = worker.websocket_scope(
                url, version, self.headers, self.client, self.server, self.scheme
            )
            self.pipeline.append(ConnectionWebSocket(self, self.requests, url, scope, method))
            return
        if upgrading:
            keep_alive = False  # a protocol this server does not speak: a plain answer, then close
        scope = worker.http_scope(
            method, url, version, self.headers, self.client, self.server, self.scheme
        )
        has_body = self.codings is not None or (
            self.content_length is not None and self.content_length != b"0"
        )
        cycle = ConnectionCycle(
            self,
            self.requests,
            url,
            scope,
            method == b"HEAD",
            http11,
            client_keepalive,
            keep_alive,
            has_body and not upgrading,
            http11 and has_body and self.expect is not None,
        )
        if cycle.receiving:
            self.receiving = cycle
        self.pipeline.append(cycle)

    def problem(self, method: bytes) -> tuple[int, str] | None:
        """What the core would refuse in this head (appmanager/request.py): status and reason."""
        # The request line and the final CRLF, as the core counts them.
        if self.head_size + len(method) + 13 > MAX_HEAD + 4:
            return 431, "request header section too large"
        if self.codings is not None and not _only_chunked(self.codings):
            return 501, "unsupported transfer coding"
        if self.content_length is not None and int(self.content_length) > MAX_BODY:
            return 413, "request body too large"
        if self.expect is not None and self.expect.lower() != b"100-continue":
            return 417, "unsupported expectation"
        return None

    def on_body(self, body: bytes) -> None:
        cycle = self.receiving
        if cycle is None:
            return
        cycle.chunks.append(body)
        cycle.received += len(body)
        self.buffered += len(body)
        if cycle.received > MAX_BODY:
            cycle.client_gone()
            self.receiving = None
            self.closing = True
            log(f"connection {self.seq}: request body over {MAX_BODY} bytes; closing")
            return
        if cycle.waiters:
            cycle.release_waiters()

    def on_message_complete(self) -> None:
        cycle = self.receiving
        if cycle is not None:
            self.receiving = None
            cycle.receiving = False
            if cycle.waiters:
                cycle.release_waiters()

    # -- requests --------------------------------------------------------------------------------

    def run_next(self) -> None:
        """Starts the next parsed request: its app call runs at once, as a task of its own when
        it has to wait. One that ends at once calls back here for the next (pipelining): those
        calls return, and this loop goes on, so that a long pipeline does not nest calls."""
        if self.starting:
            return
        self.starting = True
        try:
            while self.active is None and self.pipeline and not self.done:
                cycle = self.pipeline.popleft()
                self.active = cycle
                self.set_progress(cycle.number, RECEIVED)
                if isinstance(cycle, ConnectionWebSocket):
                    # The worker closes open WebSocket connections when the process stops.
                    self.worker.cycles.add(cycle)
                cycle.task = asgi.start_task(self.loop, cycle.run())
        finally:
            self.starting = False

    def cycle_done(self, cycle: ConnectionCycle | ConnectionWebSocket, keep: bool) -> None:
        """The active request is over: report it, then the next one, or close."""
        self.active = None
        self.last_read = self.worker.tick
        if isinstance(cycle, ConnectionCycle):
            if cycle.chunks:
                self.buffered -= sum(map(len, cycle.chunks))
                cycle.chunks.clear()
            if cycle.receiving:
                # The app answered without the whole body, which is still arriving (or never
                # will: a client that expects 100-continue): the connection cannot go on.
                keep = False
                if self.receiving is cycle:
                    self.receiving = None
        worker = self.worker
        if cycle.logged:
            if worker.access_log:
                self.log_response(cycle)
            worker.count_request()
        if keep and self.pipeline and not self.done:
            # Stopping too: the requests already parsed are answered, then the connection goes
            # back (the parser has their bytes: they cannot go back with it).
            self.run_next()
            return
        self.set_progress(cycle.number, IDLE)
        if keep and worker.stopping and self.returnable():
            self.give_back()
        elif not keep or worker.stopping or self.eof or self.closing:
            self.close()
        elif not self.reading and len(self.pipeline) <= MAX_PIPELINE:
            self.start_reading()

    def set_progress(self, number: int, state: int) -> None:
        self.worker.slots.set(self.slot, number << 2 | state)

    def refuse(self, status: int, reason: str) -> None:
        """Answers a request the way the core refuses one, once the requests before it are
        answered; nothing more is read from the connection."""
        log(f"connection {self.seq}: refused a request with {status}: {reason}")
        self.closing = True
        self.pause_reading()
        self.pipeline.append(RefusedCycle(self, self.requests, status, reason))

    def malformed(self, exc: Exception) -> None:
        """The parser found the client's bytes malformed."""
        if self.closing:
            return
        cycle = self.receiving
        if cycle is not None:
            # A body broken off (a bad chunk): its request may already be answering.
            log(f"connection {self.seq}: malformed request body: {exc}")
            cycle.malformed_body = f"malformed request body: {exc}"
            cycle.client_gone()
            self.receiving = None
            self.closing = True
            self.pause_reading()
            return
        status, reason = 400, f"malformed request: {exc}"
        codings = self.codings
        if isinstance(exc, httpparse.HeadTooLarge):
            status, reason = 431, "request header section too large"
        elif (
            self.in_head
            and codings is not None
            and self.content_length is None
            and not _only_chunked(codings)
        ):
            status, reason = 501, "unsupported transfer coding"
        self.in_head = False
        self.refuse(status, reason)

    def switch_protocols(self, rest: bytes) -> None:
        """The request just parsed switches protocols: its bytes after the head are the new
        protocol's, and the parser is done with this connection."""
        self.closing = True
        self.pause_reading()
        last = self.pipeline[-1] if self.pipeline else None
        if isinstance(last, ConnectionWebSocket):
            last.initial = rest

    def log_response(self, cycle: ConnectionCycle | ConnectionWebSocket) -> None:
        """``L``: one response for the core's access log (handoff.md)."""
        scope = cycle.scope
        request = b"%s %s HTTP/%s" % (
            cycle.method,
            cycle.target,
            scope["http_version"].encode("latin-1"),
        )
        referer = agent = b""
        for name, value in scope["headers"]:
            if name == b"referer":
                referer = referer or value
            elif name == b"user-agent":
                agent = agent or value
        if isinstance(cycle, ConnectionWebSocket):
            status, size = cycle.status, cycle.sent
            fields = b"%d %d" % (status, size) if status else b"- -"
        elif cycle.sent >= 0:
            fields = b"%d %d" % (cycle.status, cycle.sent)
        else:
            fields = b"- -"
        self.worker.reply(
            b"L %d %s\n%s\n%s\n%s"
            % (
                self.seq,
                fields,
                request[:MAX_LOG_FIELD],
                referer[:MAX_LOG_FIELD],
                agent[:MAX_LOG_FIELD],
            )
        )

    # -- closing ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """The process stops: a connection idle between requests goes back to the core now
        (``B``), a busy one after its response; one that cannot go back (closing, or a request
        parsed behind the busy one) closes."""
        if self.done or self.lingering:
            return
        if self.active is None and not self.pipeline:
            if self.returnable():
                self.give_back()
            elif self.closing or not self.in_head:
                self.close()

    def returnable(self) -> bool:
        """May the connection go back to the core as it is: open, nothing running, and nothing
        of a next request read (the parser holds no bytes of it)?"""
        return not (
            self.done
            or self.lingering
            or self.closing
            or self.eof
            or self.in_head
            or self.active is not None
            or self.pipeline
        )

    def give_back(self) -> None:
        """Lets go of the connection without closing it: descriptor (no FIN), slot, then ``B``;
        the core reads it again, and its next request goes to another process."""
        self.done = True
        self.closing = True
        self.pause_reading()
        self.writer.close()
        os.close(self.fd)
        self.writer.fd = self.fd = -1
        self.set_progress(self.requests, IDLE)
        self.worker.connection_closed(self, returned=True)

    def close(self) -> None:
        """No more requests: send FIN, then discard what the client still sends for a moment
        (LINGER), then let go. Only while no request runs."""
        if self.lingering or self.done:
            return
        self.closing = True
        self.pipeline.clear()
        self.receiving = None
        if self.eof or not shut_down(self.fd):
            self.finish()
            return
        self.lingering = True
        self.start_reading()
        self.linger_timer = self.loop.call_later(LINGER, self.finish)

    def finish(self) -> None:
        """Lets go of the connection: descriptor, slot, then ``X``."""
        if self.done:
            return
        self.done = True
        self.closing = True
        self.pause_reading()
        if self.linger_timer is not None:
            self.linger_timer.cancel()
            self.linger_timer = None
        self.pipeline.clear()
        self.writer.close()
        if not self.lingering:
            # FIN now, whatever the core does with its copy of the descriptor, and when.
            shut_down(self.fd)
        os.close(self.fd)
        self.writer.fd = self.fd = -1
        self.set_progress(self.requests, IDLE)
        self.worker.connection_closed(self)

    def sweep(self, tick: int) -> None:
        """Called about once a second: close a connection quiet for too long, answer 408 to a
        head that stalls, and cut off a body that stalls."""
        if self.done or self.lingering:
            return
        quiet = tick - self.last_read
        if self.active is not None or self.pipeline:
            cycle = self.receiving
            # Quiet while the connection is read: the client's stall, not the app's.
            if cycle is not None and self.reading and quiet > READ_TIMEOUT:
                log(f"connection {self.seq}: request body not received in time; closing")
                cycle.client_gone()
                self.receiving = None
                self.closing = True
                self.pause_reading()
        elif self.in_head:
            if quiet > READ_TIMEOUT:
                self.in_head = False
                self.refuse(408, "request not received in time")
                self.run_next()
        elif quiet > IDLE_TIMEOUT:
            self.close()


def shut_down(fd: int) -> bool:
    """Ends the sending side of a client connection (FIN); False when it is gone already."""
    # The family is given so that the socket object is made without asking the kernel for it.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return False
    finally:
        sock.detach()
    return True


def _only_chunked(codings: bytes) -> bool:
    """Whether the Transfer-Encoding values name exactly one coding, chunked (as the core
    requires; anything else is answered 501)."""
    return codings.lower().replace(b" ", b"").replace(b"\t", b"") == b"chunked"


class ConnectionCycle(asgi.HttpCycle):
    """One HTTP request on a connection the process reads itself.

    As an HttpCycle, with the body streamed from the connection: ``chunks`` holds what arrived and
    the app has not received, ``receiving`` stays true until the body is complete. Lives from its
    head until its response is over; then the connection goes on (``release``).
    """

    __slots__ = (
        "connection",
        "number",
        "target",
        "method",
        "chunks",
        "received",
        "receiving",
        "body_given",
        "continue_pending",
        "disconnected",
        "malformed_body",
    )

    # Reported (L) and counted (N, X); refusals, like the core's, are neither.
    logged = True

    def __init__(
        self,
        connection: HttpConnection,
        number: int,
        target: bytes,
        scope: asgi.Scope,
        is_head: bool,
        http11: bool,
        client_keepalive: bool,
        keep_alive: bool,
        receiving: bool,
        continue_pending: bool,
    ) -> None:
        super().__init__(
            connection.worker,
            connection.seq,
            connection.fd,
            -1,
            connection.writer,
            scope,
            b"",
            0,
            is_head,
            http11,
            client_keepalive,
            keep_alive,
        )
        self.connection = connection
        self.number = number
        self.target = target
        self.method = scope["method"].encode("latin-1") if scope else b""
        self.chunks: list[bytes] = []
        self.received = 0
        self.receiving = receiving
        self.body_given = False
        # Expect: 100-continue: the interim answer goes out when the app first asks for the body.
        self.continue_pending = continue_pending
        self.disconnected = False
        # Why the body broke off (a bad chunk), when it did: the answer is then 400, not 500.
        self.malformed_body = ""

    async def receive(self) -> Message:
        """The request body as it arrives, then ``http.disconnect`` once the response is over
        or the client is gone."""
        while True:
            if self.chunks or (not self.receiving and not self.body_given):
                return self.take_body()
            if not self.receiving or self.disconnected or self.finished:
                break
            if self.continue_pending:
                self.continue_pending = False
                if not self.started:
                    try:
                        self.writer.write(_CONTINUE)
                    except ClientDisconnected:
                        self.client_gone()
                        break
            self.connection.want_body()
            await self.wait()
        if not self.finished and not self.disconnected and self.writer.error is None:
            await self.wait()
        return {"type": "http.disconnect"}

    def take_body(self) -> Message:
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if body:
            self.connection.taken(len(body))
        more = self.receiving
        if not more:
            self.body_given = True
        return {"type": "http.request", "body": body, "more_body": more}

    async def wait(self) -> None:
        waiter = self.worker.loop.create_future()
        self.waiters.append(waiter)
        await waiter

    def client_gone(self) -> None:
        """The client is gone, or its request body broke off: the app hears http.disconnect."""
        self.disconnected = True
        self.keep_alive = False
        self.release_waiters()

    def mark_started(self) -> None:
        self.connection.set_progress(self.number, RESPONDING)

    def send_error_page(self, text: str) -> None:
        """The app gave no response: 500, or 400 when the request body was malformed (the app,
        called at the head, heard http.disconnect), as the core answers such a body."""
        if not self.malformed_body:
            super().send_error_page(text)
            return
        self.status = 0
        self.take_start({"status": 400, "headers": [(b"content-type", b"text/plain")]})
        self.send_whole(f"400 Bad Request: {self.malformed_body}\n".encode())

    def release(self, keep: bool) -> None:
        # The descriptor and writer are the connection's; only this request lets go of them.
        self.fd = -1
        self.connection.cycle_done(self, keep and not self.disconnected)


class RefusedCycle(ConnectionCycle):
    """A request the process refuses as the core would (400, 408, 413, 417, 431, 501): a small
    plain answer that closes the connection. The app never sees it."""

    __slots__ = ("reason",)

    logged = False

    def __init__(self, connection: HttpConnection, number: int, status: int, reason: str) -> None:
        super().__init__(connection, number, b"", {}, False, True, False, False, False, False)
        self.status = status
        self.reason = reason

    async def run(self) -> None:
        try:
            phrase = HTTPStatus(self.status).phrase
            body = f"{self.status} {phrase}\n{self.reason}\n".encode()
            head = (
                f"HTTP/1.1 {self.status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
                f"content-length: {len(body)}\r\ncache-control: no-store\r\n"
                "connection: close\r\n\r\n"
            ).encode("latin-1")
            self.send_first(head + body, len(body))
            self.end()
            if self.writer.pending:
                await self.writer.drain()
        except ClientDisconnected:
            pass
        finally:
            self.close()


class ConnectionWebSocket(websocket.WebSocketCycle):
    """A WebSocket upgrade on a connection the process reads itself: as a WebSocketCycle, with
    the connection's descriptor and writer, and the frames that came with the handshake. The
    connection closes when it ends."""

    def __init__(
        self,
        connection: HttpConnection,
        number: int,
        target: bytes,
        scope: dict[str, Any],
        method: bytes,
    ) -> None:
        super().__init__(
            connection.worker, connection.seq, [connection.fd], scope, method, connection.writer
        )
        self.connection = connection
        self.number = number
        self.target = target
        self.method = method
        self.logged = True

    def mark_started(self) -> None:
        self.connection.set_progress(self.number, RESPONDING)

    def client_gone(self) -> None:
        self.lost()

    def release(self) -> None:
        self.fds = []
        self.fd = -1
        self.connection.cycle_done(self, False)
