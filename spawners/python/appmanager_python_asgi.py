"""The Python shim's ASGI server: ASGI 3 apps on an asyncio event loop, many requests at once.

Loaded by ``appmanager_python.py`` once the app is known to be an ASGI app. The loop reads the
control channel with a reader callback; each ``Q`` message becomes a task that runs the app on an
HTTP scope, or on a websocket scope when the core hands the connection over for an upgrade
(``appmanager_python_websocket.py``). Requests are answered in any order, each with its own ``D``:
READY says ``concurrency`` 0 (handoff.md). Each ``C`` message hands over a whole client connection,
whose requests the process reads and serves itself (``appmanager_python_http.py``): READY says
``"connections": true``.

The app's lifespan scope lasts as long as the process: its startup runs in step LOAD_APP, before
READY; its shutdown after EOF on the control channel (or SIGTERM), once the requests in flight are
answered and the connections closed.

What this server cannot know of a request handed over with ``Q``: that its client went away while
the app works on it. The core is the only reader of that connection (handoff.md), so
``http.disconnect`` comes once the response is sent or when a write to the client fails, never
while the response is still owed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import sys
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

if TYPE_CHECKING:
    # Run as a script, the shim imports its modules from its own directory; mypy, run from the
    # repository root, knows them by their package path.
    from spawners.python import appmanager_python_handoff as handoff
    from spawners.python import appmanager_python_websocket as websocket
else:
    import appmanager_python_handoff as handoff
    import appmanager_python_websocket as websocket

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ASGI_VERSION = "3.0"
# The HTTP and WebSocket spec version served: 2.3 adds the reason of websocket.close.
SPEC_VERSION = "2.3"
# A body that came in a file reaches the app in pieces of this size.
BODY_CHUNK = 256 * 1024
# How long the app's lifespan shutdown may take before the process exits anyway.
SHUTDOWN_TIMEOUT = 10.0
# Control messages taken per wake-up: a burst is read in one go, but writes still get their turn.
MAX_BATCH = 64
# Listener addresses are few; the scope's "server" for each is built once, for up to this many.
MAX_CACHED_SERVERS = 64
# How long stopping waits for the core to take the last D messages when its end is full.
REPLY_FLUSH_TIMEOUT = 5.0

ClientDisconnected = handoff.ClientDisconnected
ProtocolError = handoff.ProtocolError
log = handoff.log
_pack_seq = handoff.pack_seq
# Bound once: module attribute lookups add up on the per-request path.
_ANCILLARY_SIZE = handoff.ANCILLARY_SIZE
_RECV_FLAGS = handoff.RECV_FLAGS
_received_fds = handoff.received_fds
_read_request = handoff.read_request

_STATUS_LINES = {int(s): f"HTTP/1.1 {int(s)} {s.phrase}\r\n".encode() for s in HTTPStatus}
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}
_HTTP_VERSIONS = {b"HTTP/1.1": "1.1", b"HTTP/1.0": "1.0"}
_SCHEMES = {b"http": "http", b"https": "https"}
# Request headers that say something about the body as the client framed it; the core de-chunked
# it, and its length is body_len.
_BODY_FRAMING = frozenset((b"transfer-encoding", b"content-length"))
# Request headers the server reads besides passing them on.
_NOTED_REQUEST_HEADERS = _BODY_FRAMING | {b"connection", b"upgrade"}
# Response headers the server owns: framing and connection management are its job, not the app's.
_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"transfer-encoding"))
_SPECIAL_RESPONSE_HEADERS = _HOP_BY_HOP | {b"content-length", b"date"}


if sys.version_info >= (3, 12):

    def start_task(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
    ) -> asyncio.Task[None]:
        """A task for a request, started at once: an app that never has to wait (a plain
        response) runs to its end here, without a trip through the loop's ready queue."""
        return asyncio.Task(coro, loop=loop, eager_start=True)

else:

    def start_task(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
    ) -> asyncio.Task[None]:
        """A task for a request. Python < 3.12 cannot start one eagerly, and running its first
        step before the Task exists would not do: anyio's cancel scopes (Starlette, FastAPI)
        must find the same current task in every step."""
        return loop.create_task(coro)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when the app's Python has it (as uvicorn's default does), else asyncio's.
    The shim itself needs only the standard library; uvloop roughly halves the loop's own cost
    per request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ClientWriter:
    """Writes to a client connection from the event loop without ever blocking.

    The descriptor stays non-blocking (its O_NONBLOCK is shared with the core's copy): ``write``
    sends at once what the socket takes and queues the rest, which a writer callback flushes;
    ``drain`` waits until the queue is empty, failing after WRITE_TIMEOUT seconds without
    progress. Lives for one request or WebSocket connection; ``close`` must come before the
    descriptor is closed, so that the selector forgets it first (epoll would otherwise go on
    watching a file description the core still holds open).
    """

    __slots__ = ("fd", "loop", "pending", "waiters", "error", "watching", "timer", "progress_at")

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self.fd = fd
        self.loop = loop
        self.pending: deque[memoryview] = deque()
        self.waiters: list[asyncio.Future[None]] = []
        self.error: BaseException | None = None
        self.watching = False
        self.timer: asyncio.TimerHandle | None = None
        self.progress_at = 0.0

    def write(self, data: bytes) -> None:
        """Sends ``data`` or queues what the socket does not take now; raises ClientDisconnected
        when an earlier write failed or this one does."""
        if self.error is not None:
            raise ClientDisconnected(f"writing to the client failed: {self.error}")
        if self.pending:
            self.pending.append(memoryview(data))
            return
        try:
            sent = os.write(self.fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.error = exc
            raise ClientDisconnected(f"writing to the client failed: {exc}") from exc
        if sent < len(data):
            self.pending.append(memoryview(data)[sent:])
            self._watch()

    async def drain(self) -> None:
        """Waits until everything written has reached the socket."""
        if self.pending:
            waiter = self.loop.create_future()
            self.waiters.append(waiter)
            await waiter
        if self.error is not None:
            raise ClientDisconnected(f"writing to the client failed: {self.error}")

    async def wait_writable(self) -> None:
        """Waits until the socket takes more bytes; for writes that bypass the queue
        (sendfile)."""
        await self.drain()
        waiter = self.loop.create_future()
        self.loop.add_writer(self.fd, _wake, waiter)
        timer = self.loop.call_later(handoff.WRITE_TIMEOUT, _time_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.loop.remove_writer(self.fd)

    def close(self) -> None:
        """Drops what is still queued and lets go of the descriptor; the caller closes it."""
        if self.watching or self.waiters:
            self.pending.clear()
            self._unwatch(None)

    def _watch(self) -> None:
        self.watching = True
        self.progress_at = self.loop.time()
        self.loop.add_writer(self.fd, self._flush)
        self.timer = self.loop.call_later(handoff.WRITE_TIMEOUT, self._check_progress)

    def _unwatch(self, error: BaseException | None) -> None:
        if error is not None and self.error is None:
            self.error = error
        if self.watching:
            self.watching = False
            self.loop.remove_writer(self.fd)
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _flush(self) -> None:
        pending = self.pending
        while pending:
            data = pending[0]
            try:
                sent = os.write(self.fd, data)
            except BlockingIOError:
                return
            except OSError as exc:
                pending.clear()
                self._unwatch(exc)
                return
            self.progress_at = self.loop.time()
            if sent < len(data):
                pending[0] = data[sent:]
                return
            pending.popleft()
        self._unwatch(None)

    def _check_progress(self) -> None:
        self.timer = None
        idle = self.loop.time() - self.progress_at
        if idle < handoff.WRITE_TIMEOUT:
            self.timer = self.loop.call_later(handoff.WRITE_TIMEOUT - idle, self._check_progress)
            return
        self.pending.clear()
        self._unwatch(TimeoutError(f"client read nothing for {handoff.WRITE_TIMEOUT:.0f} s"))


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(
            ClientDisconnected(f"client read nothing for {handoff.WRITE_TIMEOUT:.0f} s")
        )


class HttpCycle:
    """One HTTP request in flight: the app's ``receive`` and ``send``, and the response on its way
    to the client.

    Lives from its ``Q`` message to its ``D``; owns the descriptors that came with the message
    and closes them at the end. The head goes out with the first ``http.response.body`` message,
    together with that body when it is the last, so a plain response is one write. Invariants:
    once ``started``, status and headers never change and ``chunked`` and ``remaining`` describe
    the framing; ``finished`` implies ``started`` (until ``close``, after which every send fails);
    ``keep_alive`` only goes from true to false; ``sent`` is -1 until the head has been written,
    then the body bytes written since (the access log's size, in ``D``).
    """

    __slots__ = (
        "worker",
        "seq",
        "fd",
        "body_fd",
        "writer",
        "scope",
        "body",
        "body_len",
        "body_sent",
        "is_head",
        "http11",
        "client_keepalive",
        "keep_alive",
        "status",
        "header_block",
        "content_length",
        "has_date",
        "bodiless",
        "started",
        "chunked",
        "remaining",
        "finished",
        "sent",
        "waiters",
        "task",
    )

    def __init__(
        self,
        worker: Worker,
        seq: int,
        fd: int,
        body_fd: int,
        writer: ClientWriter,
        scope: Scope,
        body: bytes,
        body_len: int,
        is_head: bool,
        http11: bool,
        client_keepalive: bool,
        keep_alive: bool,
    ) -> None:
        self.worker = worker
        self.seq = seq
        self.fd = fd
        # The file holding the body (flag F), or -1 when the body came inline.
        self.body_fd = body_fd
        self.writer = writer
        self.scope = scope
        self.body = body
        self.body_len = body_len
        # How much of the body the app has received; -1 before its first http.request.
        self.body_sent = -1
        self.is_head = is_head
        self.http11 = http11
        # An HTTP/1.0 client asked for keep-alive; it only keeps the connection if told so.
        self.client_keepalive = client_keepalive
        self.keep_alive = keep_alive
        self.status = 0
        self.header_block = b""
        self.content_length: int | None = None
        self.has_date = False
        self.bodiless = is_head
        self.started = False
        self.chunked = False
        # Bytes of the app's Content-Length still to send; None when the length is not the app's.
        self.remaining: int | None = None
        self.finished = False
        # Body bytes written, for the access log (D); -1 until the head went out.
        self.sent = -1
        # receive() calls waiting for the response to end, to hear http.disconnect.
        self.waiters: list[asyncio.Future[None]] = []
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Runs the app on the request, then reports ``D``; errors become a 500 page or a closed
        connection."""
        try:
            await self.worker.app(self.scope, self.receive, self.send)
            if not self.finished:
                self.unfinished()
            if self.writer.pending:
                await self.writer.drain()
        except ClientDisconnected:
            self.keep_alive = False
        except Exception as exc:
            self.app_failed(exc)
        finally:
            self.close()

    def close(self) -> None:
        """Lets go of the request: waiting receive() calls, then what ``release`` does."""
        keep = self.keep_alive and self.finished and not self.writer.pending
        self.finished = True
        self.body_sent = self.body_len
        self.release_waiters()
        self.worker.cycles.discard(self)
        self.release(keep)

    def release(self, keep: bool) -> None:
        """The end of a request handed over with ``Q``: its descriptors closed, then ``D``, with
        the status and body size once the response began."""
        self.writer.close()
        os.close(self.fd)
        if self.body_fd >= 0:
            os.close(self.body_fd)
        # A task the app left behind may still hold send and receive: the numbers of closed
        # descriptors may already belong to another request's, so nothing may touch them.
        self.writer.fd = self.fd = self.body_fd = -1
        flag = b"k" if keep else b"c"
        if self.sent < 0:
            self.worker.reply(b"D %d %b" % (self.seq, flag))
        else:
            self.worker.reply(b"D %d %b %d %d" % (self.seq, flag, self.status, self.sent))

    async def receive(self) -> Message:
        """The request body as ``http.request`` messages, then ``http.disconnect`` once the
        response is over."""
        if self.body_sent < self.body_len:
            if self.body_fd < 0:
                self.body_sent = self.body_len
                body = self.body
                self.body = b""
                return {"type": "http.request", "body": body, "more_body": False}
            offset = max(self.body_sent, 0)
            chunk = os.pread(self.body_fd, min(BODY_CHUNK, self.body_len - offset), offset)
            # A file shorter than body_len would be the core's bug; end the body there anyway.
            self.body_sent = offset + len(chunk) if chunk else self.body_len
            more = self.body_sent < self.body_len
            return {"type": "http.request", "body": chunk, "more_body": more}
        if not self.finished and self.writer.error is None:
            waiter = self.worker.loop.create_future()
            self.waiters.append(waiter)
            await waiter
        return {"type": "http.disconnect"}

    def release_waiters(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def send(self, message: Message) -> None:
        """Takes ``http.response.start``, ``http.response.body`` and
        ``http.response.pathsend``."""
        kind = message["type"]
        if kind == "http.response.body":
            if self.finished or not self.status:
                raise RuntimeError(self.out_of_order(kind))
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if not self.started:
                if more:
                    self.start_stream(body)
                else:
                    self.send_whole(body)
            else:
                self.send_more(body, more)
            if self.writer.pending:
                await self.writer.drain()
        elif kind == "http.response.start":
            if self.status:
                raise RuntimeError(self.out_of_order(kind))
            self.take_start(message)
        elif kind == "http.response.pathsend":
            if self.finished or self.started or not self.status:
                raise RuntimeError(self.out_of_order(kind))
            await self.send_path(message["path"])
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on an HTTP scope")

    def out_of_order(self, kind: str) -> str:
        if self.finished:
            return f"{kind} sent after the response was complete"
        if self.status:
            return f"{kind} sent twice"
        return f"{kind} sent before http.response.start"

    def take_start(self, message: Message) -> None:
        """Validates and keeps the status and headers; raises before anything is kept."""
        status = message["status"]
        if not isinstance(status, int) or not 100 <= status <= 999:
            raise ValueError(f"invalid HTTP status {status!r}")
        parts: list[bytes] = []
        lines = 0
        content_length = None
        has_date = False
        keep_alive = self.keep_alive
        for name, value in message.get("headers", ()):
            lower = name.lower()
            if lower in _SPECIAL_RESPONSE_HEADERS:
                if lower == b"content-length":
                    if not value.strip().isdigit():
                        raise ValueError(f"invalid content-length {value!r}")
                    content_length = int(value)
                elif lower == b"date":
                    has_date = True
                elif lower == b"connection" and b"close" in value.lower():
                    keep_alive = False
                if lower in _HOP_BY_HOP:
                    continue
            parts += (name, b": ", value, b"\r\n")
            lines += 1
        block = b"".join(parts)
        # A CR or LF inside a name or a value would let the app forge headers or split the
        # response; counting them is cheaper than looking into every header.
        if block.count(b"\n") != lines or block.count(b"\r") != lines:
            raise ValueError("a response header holds CR or LF")
        self.status = status
        self.header_block = block
        self.content_length = content_length
        self.has_date = has_date
        self.keep_alive = keep_alive
        # 1xx, 204 and 304 responses have no body, whatever the app sends.
        self.bodiless = self.is_head or status < 200 or status == 204 or status == 304

    def head(self, framing: bytes) -> bytes:
        """The status line and headers, ``framing`` (a content-length or transfer-encoding
        line, or b"") included; the connection header follows ``keep_alive``."""
        status = self.status
        line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status
        date = b"" if self.has_date else self.worker.date.raw()
        if not self.keep_alive:
            connection = b"connection: close\r\n"
        elif not self.http11 and self.client_keepalive:
            connection = b"connection: keep-alive\r\n"
        else:
            connection = b""
        return b"%s%s%s%s%s\r\n" % (line, self.header_block, date, framing, connection)

    def send_first(self, data: bytes, count: int) -> None:
        """Writes the response's first bytes, the head and ``count`` bytes of body; the progress
        file says so first."""
        self.mark_started()
        self.started = True
        self.writer.write(data)
        self.sent = count

    def mark_started(self) -> None:
        """The progress file says the response begins (handoff.md: the core reads it only if
        the process dies holding the request)."""
        os.pwrite(self.worker.progress_fd, _pack_seq(self.seq), 0)

    def send_whole(self, body: bytes) -> None:
        """Sends a response whose body is known in full: head and body in one write."""
        if self.bodiless:
            # HEAD: a length the body gives is what GET would send; an empty body says nothing
            # (the app may skip it for HEAD). 1xx, 204 and 304 never get one.
            framing = (
                b"content-length: %d\r\n" % len(body)
                if self.is_head and body and self.content_length is None
                else b""
            )
            self.send_first(self.head(framing), 0)
        elif self.content_length is None:
            self.send_first(self.head(b"content-length: %d\r\n" % len(body)) + body, len(body))
        else:
            if len(body) < self.content_length:
                self.keep_alive = False  # the client will wait for bytes that never come
            body = body[: self.content_length]
            self.send_first(self.head(b"") + body, len(body))
        self.end()

    def start_stream(self, first: bytes) -> None:
        """Sends the head with the first piece of a body whose length is not known yet."""
        if self.bodiless:
            self.send_first(self.head(b""), 0)
        elif self.content_length is not None:
            first = first[: self.content_length]
            self.remaining = self.content_length - len(first)
            self.send_first(self.head(b"") + first, len(first))
        elif self.http11:
            self.chunked = True
            head = self.head(b"transfer-encoding: chunked\r\n")
            chunk = b"%x\r\n%b\r\n" % (len(first), first) if first else b""
            self.send_first(head + chunk, len(first))
        else:
            # HTTP/1.0 cannot chunk: the body ends where the connection does.
            self.keep_alive = False
            self.send_first(self.head(b"") + first, len(first))

    def send_more(self, body: bytes, more: bool) -> None:
        """Sends the next piece of a streamed body; the last one ends it."""
        if self.bodiless:
            data = b""
        elif self.chunked:
            data = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            if not more:
                data += b"0\r\n\r\n"
        elif self.remaining is not None:
            body = data = body[: self.remaining]
            self.remaining -= len(data)
        else:
            data = body
        if data:
            self.writer.write(data)
            self.sent += len(body)
        if not more:
            if self.remaining:
                self.keep_alive = False
            self.end()

    async def send_path(self, path: str) -> None:
        """``http.response.pathsend``: a file's contents as the whole body, with sendfile(2)."""
        file_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(file_fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"http.response.pathsend: {path} is not a regular file")
            size = st.st_size
            count = size if self.content_length is None else min(size, self.content_length)
            framing = b"content-length: %d\r\n" % size if self.content_length is None else b""
            if self.bodiless and not self.is_head:
                framing = b""
            self.send_first(self.head(framing), 0)
            if not self.bodiless:
                sent = self.sent = await self.sendfile(file_fd, count)
                if sent < (size if self.content_length is None else self.content_length):
                    self.keep_alive = False  # the file shrank; the length announced is a lie
        finally:
            os.close(file_fd)
        if self.writer.pending:
            await self.writer.drain()
        self.end()

    async def sendfile(self, file_fd: int, count: int) -> int:
        """Sends the first ``count`` bytes of a file; returns how many were sent, fewer when the
        file turned out shorter."""
        writer = self.writer
        await writer.drain()
        total = 0
        while total < count:
            try:
                sent = os.sendfile(self.fd, file_fd, total, count - total)
            except BlockingIOError:
                await writer.wait_writable()
                continue
            except OSError as exc:
                writer.error = exc
                raise ClientDisconnected(f"sending the file failed: {exc}") from exc
            if sent == 0:
                break
            total += sent
        return total

    def end(self) -> None:
        """The response is complete: receive() now says http.disconnect."""
        self.finished = True
        if self.waiters:
            self.release_waiters()

    def unfinished(self) -> None:
        """The app returned without completing its response."""
        if self.started:
            log(f"request {self.seq}: the app returned before finishing its response")
            self.keep_alive = False
            return
        log(f"request {self.seq}: the app returned without completing a response")
        self.send_error_page("")

    def app_failed(self, exc: Exception) -> None:
        """Answers 500 when nothing was sent yet; otherwise the connection must close."""
        scope = self.scope
        text = "".join(traceback.format_exception(exc))
        log(f"error in request {self.seq} ({scope['method']} {scope['path']}):\n{text}")
        if self.started:
            if not self.finished:
                self.keep_alive = False
            return
        try:
            self.send_error_page(text)
        except ClientDisconnected:
            self.keep_alive = False

    def send_error_page(self, text: str) -> None:
        """A 500 in place of whatever the app had started (nothing of it was sent)."""
        self.status = 0
        self.take_start(
            {
                "status": 500,
                "headers": [(b"content-type", b"text/html; charset=utf-8")],
            }
        )
        self.send_whole(handoff.error_page(text, self.worker.development))


class Lifespan:
    """The app's lifespan scope: one call of the app that lasts as long as the process.

    ``startup`` runs in step LOAD_APP; ``shutdown`` once the process stops serving. An app that
    raises on the lifespan scope before asking for its first event, or returns at once, does not
    speak the protocol (uvicorn's "auto"): the process goes on without it. Invariants: the
    ``state`` dict is the one every request scope gets a copy of; once ``supported`` is false it
    stays false.
    """

    def __init__(self, app: ASGIApp, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.loop = loop
        self.state: dict[str, Any] = {}
        self.events: deque[Message] = deque()
        self.event_waiter: asyncio.Future[None] | None = None
        self.asked = False
        self.supported = True
        self.task: asyncio.Task[None] | None = None
        # The app's answer to the phase in progress: None for complete, the message for failed.
        self.answer: asyncio.Future[str | None] | None = None

    async def startup(self) -> None:
        """Sends ``lifespan.startup`` and waits for the answer; raises StartupFailed."""
        scope = {
            "type": "lifespan",
            "asgi": {"version": ASGI_VERSION, "spec_version": "2.0"},
            "state": self.state,
        }
        self.task = self.loop.create_task(self.call_app(scope))
        message = await self.phase("lifespan.startup")
        if self.answer_came:
            if message is not None:
                raise handoff.StartupFailed(f"lifespan startup failed: {message}")
            return
        # The app ended its lifespan call without answering.
        task = self.task
        self.supported = False
        exc = task.exception()
        if exc is None:
            return
        if not self.asked:
            log(
                f"the app does not support the lifespan protocol ({type(exc).__name__}: {exc}); "
                "serving without it"
            )
            return
        raise handoff.StartupFailed(
            f"lifespan startup failed: {type(exc).__name__}: {exc}"
        ) from exc

    async def call_app(self, scope: Scope) -> None:
        await self.app(scope, self.receive, self.send)

    async def shutdown(self) -> None:
        """Sends ``lifespan.shutdown`` and waits for the answer, at most SHUTDOWN_TIMEOUT."""
        task = self.task
        if not self.supported or task is None:
            return
        if task.done():
            if not task.cancelled() and task.exception() is not None:
                log("the app's lifespan ended early:\n" + _format(task.exception()))
            return
        message = await self.phase("lifespan.shutdown", SHUTDOWN_TIMEOUT)
        if not self.answer_came and not task.done():
            log(f"the app's lifespan shutdown did not complete in {SHUTDOWN_TIMEOUT:.0f} s")
            task.cancel()
            return
        if message is not None:
            log(f"lifespan shutdown failed: {message}")
        elif task.done() and not task.cancelled() and task.exception() is not None:
            log("the app's lifespan shutdown raised:\n" + _format(task.exception()))

    async def phase(self, event: str, timeout: float | None = None) -> str | None:
        """Sends ``event`` and waits for the app's answer, or for its lifespan call to end, or
        for ``timeout``; returns None, or the message of a ``failed`` answer."""
        assert self.task is not None
        answer: asyncio.Future[str | None] = self.loop.create_future()
        self.answer = answer
        self.events.append({"type": event})
        if self.event_waiter is not None and not self.event_waiter.done():
            self.event_waiter.set_result(None)
        await asyncio.wait(
            (answer, self.task), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        return answer.result() if answer.done() else None

    @property
    def answer_came(self) -> bool:
        return self.answer is not None and self.answer.done()

    async def receive(self) -> Message:
        self.asked = True
        while not self.events:
            self.event_waiter = self.loop.create_future()
            await self.event_waiter
        return self.events.popleft()

    async def send(self, message: Message) -> None:
        kind = message["type"]
        answer = self.answer
        if kind not in (
            "lifespan.startup.complete",
            "lifespan.startup.failed",
            "lifespan.shutdown.complete",
            "lifespan.shutdown.failed",
        ):
            raise RuntimeError(f"unexpected ASGI message {kind!r} on the lifespan scope")
        if answer is None or answer.done():
            raise RuntimeError(f"{kind} sent when no lifespan event was waiting for it")
        answer.set_result(str(message.get("message", "")) if kind.endswith(".failed") else None)


def _format(exc: BaseException | None) -> str:
    return "".join(traceback.format_exception(exc)) if exc is not None else ""


class Worker:
    """Serves requests from the control channel on one event loop, many at once, for the life of
    the process.

    Created in step LOAD_APP once the app is loaded; lives until EOF on the control channel or
    SIGTERM, then lets the requests in flight finish and runs the lifespan shutdown. Each request
    handed over with ``Q`` is an HttpCycle (or a WebSocket cycle) in ``cycles``, which owns its
    descriptors; each connection handed over whole with ``C`` is an HttpConnection in
    ``connections`` (``appmanager_python_http.py``), which owns its descriptor and runs its
    requests' cycles.
    """

    # READY's "concurrency": unlimited.
    concurrency = 0
    # READY's "connections": whole connections (C messages) are served too.
    takes_connections = True

    def __init__(
        self,
        control: socket.socket,
        progress_fd: int,
        app: ASGIApp,
        base_uri: str,
        development: bool,
        access_log: bool = False,
        max_requests: int = 0,
    ) -> None:
        self.control = control
        self.control_fd = control.fileno()
        self.progress_fd = progress_fd
        self.app = app
        self.development = development
        # "/" or "/app/" mean the same mount point as "" and "/app".
        self.root_path = base_uri.rstrip("/")
        self.buffer = bytearray(handoff.MAX_MESSAGE)
        self.view = memoryview(self.buffer)
        self.date = handoff.DateHeader()
        self.loop = new_event_loop()
        # Libraries that call asyncio.get_event_loop() outside a coroutine find this one.
        asyncio.set_event_loop(self.loop)
        self.lifespan = Lifespan(app, self.loop)
        # What the lifespan startup left in its state; each request scope gets a copy.
        self.state = self.lifespan.state
        # The scope's "server" for each listener address the core reports, built once.
        self.servers: dict[bytes, tuple[str, int]] = {}
        self.cycles: set[HttpCycle | websocket.WebSocketCycle] = set()
        # D messages the control channel did not take at once, in order.
        self.replies: deque[bytes] = deque()
        self.stopped: asyncio.Future[None] = self.loop.create_future()
        self.stopping = False
        self.control_broken = False
        # Whole connections (C): the core keeps an access log, so each response is reported (L).
        self.access_log = access_log
        self.connections: set[httpconn.HttpConnection] = set()
        # The connections' slots of the progress file (the process is forked by now, if it is).
        self.slots = httpconn.ProgressSlots(progress_fd)
        # Requests served on connections and not reported yet (N, X); a report goes out every
        # report_every, so that the core's max_requests overshoots by a tenth at most.
        self.unreported = 0
        every = httpconn.REPORT_EVERY
        self.report_every = max(1, min(every, max_requests // 10)) if max_requests else every
        # One read buffer for every connection: what is read is parsed before the next read.
        self.read_view = memoryview(bytearray(httpconn.READ_SIZE))
        self.read_buffers = [self.read_view]
        # Seconds since the first connection, counted by the sweep that times connections out.
        self.tick = 0
        self.sweeper: asyncio.TimerHandle | None = None
        self.connections_gone: asyncio.Future[None] | None = None

    def startup(self) -> None:
        """The app's start-up before READY: the lifespan startup; raises StartupFailed."""
        self.loop.run_until_complete(self.lifespan.startup())

    def listen(self) -> None:
        """Step LISTEN: the control channel and the signal handling serving needs, in place
        before READY goes out."""
        self.control.setblocking(False)
        self.loop.add_reader(self.control_fd, self.on_control)
        # uvloop hears signals only while its loop runs: a SIGTERM between READY and serve() would
        # be lost. It waits, blocked, until serve_until_stopped takes it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        self.loop.add_signal_handler(signal.SIGTERM, self.on_sigterm)
        # An app may have set SIGPIPE back to its default, which would kill us on a client reset.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def serve(self) -> None:
        """Serves until EOF on the control channel or SIGTERM, then stops in order."""
        try:
            self.loop.run_until_complete(self.serve_until_stopped())
        finally:
            self.close_loop()

    async def serve_until_stopped(self) -> None:
        # The loop runs: SIGTERM reaches on_sigterm now, one that came since LISTEN included.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        await self.stopped
        # Open WebSocket connections would hold the process forever: the server goes away.
        for cycle in list(self.cycles):
            if isinstance(cycle, websocket.WebSocketCycle):
                cycle.going_away()
        # Idle connections close now, busy ones once their responses are out.
        for connection in list(self.connections):
            connection.stop()
        tasks = [cycle.task for cycle in self.cycles if cycle.task is not None]
        if tasks:
            await asyncio.wait(tasks)
        if self.connections:
            self.connections_gone = self.loop.create_future()
            await self.connections_gone
        if self.sweeper is not None:
            self.sweeper.cancel()
        await self.lifespan.shutdown()
        await self.flush_replies()

    def close_loop(self) -> None:
        """Cancels what the app left running, then closes the loop."""
        loop = self.loop
        left = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.remove_signal_handler(signal.SIGTERM)
        loop.close()

    def on_sigterm(self) -> None:
        """Serves what the core already sent, then stops. A second SIGTERM (the core's, after
        its grace) lets go of the connections that no request holds any more."""
        if not self.stopping:
            self.on_control(drain=True)
            self.stop()
            return
        for connection in list(self.connections):
            if connection.active is None:
                connection.finish()

    def stop(self) -> None:
        """Takes no more requests; serve() finishes those in flight and returns."""
        if self.stopping:
            return
        self.stopping = True
        self.loop.remove_reader(self.control_fd)
        if not self.stopped.done():
            self.stopped.set_result(None)

    def on_control(self, drain: bool = False) -> None:
        """Takes the control messages that are waiting, a batch at a time (all with ``drain``)."""
        control = self.control
        buffer = self.buffer
        taken = 0
        while drain or taken < MAX_BATCH:
            try:
                nbytes, ancdata, msg_flags, _ = control.recvmsg_into(
                    [buffer], _ANCILLARY_SIZE, _RECV_FLAGS
                )
            except BlockingIOError:
                return
            except OSError as exc:
                self.control_failed(exc)
                return
            if nbytes == 0:
                self.stop()
                return
            taken += 1
            self.take(nbytes, msg_flags, _received_fds(ancdata))

    def take(self, nbytes: int, msg_flags: int, fds: list[int]) -> None:
        """Starts serving one ``Q`` message (or ``C``: a whole connection); a message it cannot
        read is answered ``D c`` (``X``)."""
        connection = self.buffer[0] == 0x43  # C
        try:
            if connection:
                handed = httpconn.read_connection(
                    self, self.buffer, self.view, nbytes, msg_flags, fds
                )
            else:
                request = _read_request(self.buffer, self.view, nbytes, msg_flags, len(fds))
                cycle = self.cycle(request, fds)
        except Exception as exc:
            for fd in fds:
                os.close(fd)
            seq = handoff.request_seq(self.view, nbytes)
            if seq is None:
                log(f"ignoring unreadable control message {bytes(self.view[:80])!r}")
                return
            what = "connection" if connection else "request"
            if isinstance(exc, ProtocolError):
                log(f"{what} {seq}: protocol error: {exc}")
            else:
                log(f"{what} {seq}: internal error:\n{traceback.format_exc()}")
            self.reply(b"X %d 0" % seq if connection else b"D %d c" % seq)
            return
        if connection:
            httpconn.HttpConnection(self, *handed)
            return
        self.cycles.add(cycle)
        cycle.task = start_task(self.loop, cycle.run())

    def cycle(
        self, request: handoff.Request, fds: list[int]
    ) -> HttpCycle | websocket.WebSocketCycle:
        """The HttpCycle (or WebSocket cycle) for a request, its scope built from the head."""
        (
            seq,
            flags,
            raddr,
            rport,
            saddr,
            sport,
            scheme,
            head,
            body,
            body_len,
            _,
        ) = request
        # Split on LF and strip CR from what matters: CRLF is standard, a bare LF costs nothing.
        lines = head.split(b"\n")
        try:
            method, target, version = lines[0].split()
        except ValueError:
            raise ProtocolError(f"unreadable request line {lines[0][:80]!r}") from None
        headers: list[tuple[bytes, bytes]] = []
        connection = upgrade = b""
        has_length = False
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                continue
            name = name.lower()
            value = value.strip()
            if name in _NOTED_REQUEST_HEADERS:
                if name in _BODY_FRAMING:
                    has_length = True
                    continue
                if name == b"connection":
                    connection = connection + b"," + value if connection else value
                else:
                    upgrade = value
            headers.append((name, value))
        # The core de-chunked the body; its length is body_len, whatever the head says.
        if body_len or has_length:
            headers.append((b"content-length", b"%d" % body_len))

        http_version = _HTTP_VERSIONS.get(version) or version.decode("latin-1")[5:]
        client = (raddr.decode(), int(rport))
        server = self.servers.get(saddr + sport)
        if server is None:
            server = self.server_address(saddr, sport)
        scheme_name = _SCHEMES.get(scheme) or scheme.decode("latin-1")
        client_close = client_keepalive = False
        if connection:
            client_close, client_keepalive = handoff.connection_tokens(connection.decode("latin-1"))
        upgrading = b"U" in flags
        if upgrading and upgrade.lower() == b"websocket":
            return websocket.WebSocketCycle(
                self,
                seq,
                fds,
                self.websocket_scope(target, http_version, headers, client, server, scheme_name),
                method,
                ClientWriter(fds[0], self.loop),
            )
        scope = self.http_scope(method, target, http_version, headers, client, server, scheme_name)
        http11 = version == b"HTTP/1.1"
        # An upgrade this server does not speak is served as a plain request; the core closes
        # the connection after the D (handoff.md).
        keep_alive = (
            b"K" in flags and not upgrading and not client_close and (http11 or client_keepalive)
        )
        return HttpCycle(
            self,
            seq,
            fds[0],
            fds[1] if len(fds) > 1 else -1,
            ClientWriter(fds[0], self.loop),
            scope,
            body,
            body_len,
            method == b"HEAD",
            http11,
            client_keepalive,
            keep_alive,
        )

    def http_scope(
        self,
        method: bytes,
        target: bytes,
        http_version: str,
        headers: list[tuple[bytes, bytes]],
        client: tuple[str, int],
        server: tuple[str, int],
        scheme: str,
    ) -> Scope:
        """The scope of an HTTP request: ``target`` as the request line has it, header names in
        lowercase."""
        path, raw_path, query = _split_target(target)
        return {
            "type": "http",
            "asgi": {"version": ASGI_VERSION, "spec_version": SPEC_VERSION},
            "http_version": http_version,
            "method": _METHODS.get(method) or method.decode("latin-1"),
            "scheme": scheme,
            # The whole path, the root path included, as the ASGI spec has it (frameworks take
            # the root path off themselves; WSGI's PATH_INFO is what is left).
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": self.root_path,
            "headers": headers,
            "client": client,
            "server": server,
            "state": self.state.copy(),
            "extensions": {"http.response.pathsend": {}},
        }

    def websocket_scope(
        self,
        target: bytes,
        http_version: str,
        headers: list[tuple[bytes, bytes]],
        client: tuple[str, int],
        server: tuple[str, int],
        scheme: str,
    ) -> Scope:
        """The scope of a WebSocket handshake (``scheme`` is the HTTP one: http or https)."""
        path, raw_path, query = _split_target(target)
        return {
            "type": "websocket",
            "asgi": {"version": ASGI_VERSION, "spec_version": SPEC_VERSION},
            "http_version": http_version,
            "scheme": "wss" if scheme == "https" else "ws",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": self.root_path,
            "headers": headers,
            "client": client,
            "server": server,
            "subprotocols": websocket.subprotocols(headers),
            "state": self.state.copy(),
        }

    # -- whole connections (C) -----------------------------------------------------------------

    def add_connection(self, connection: httpconn.HttpConnection) -> None:
        """A connection handed over whole begins; connections need the sweep that times them
        out."""
        if self.sweeper is None:
            self.sweeper = self.loop.call_later(1.0, self.sweep)
        self.connections.add(connection)

    def connection_closed(
        self, connection: httpconn.HttpConnection, returned: bool = False
    ) -> None:
        """``X`` (or ``B``, for a connection given back to the core), with the requests not
        reported yet; the last connection of a stopping process lets it go on stopping."""
        self.connections.discard(connection)
        if returned:
            self.reply(b"B %d %d\n" % (connection.seq, self.unreported))
        else:
            self.reply(b"X %d %d" % (connection.seq, self.unreported))
        self.unreported = 0
        gone = self.connections_gone
        if not self.connections and gone is not None and not gone.done():
            gone.set_result(None)

    def count_request(self) -> None:
        """One more request served on a connection; ``N`` once enough add up."""
        self.unreported += 1
        if self.unreported >= self.report_every:
            self.reply(b"N %d" % self.unreported)
            self.unreported = 0

    def sweep(self) -> None:
        """Once a second: the tick that connections measure quiet time in, and their timeouts."""
        self.tick += 1
        for connection in list(self.connections):
            connection.sweep(self.tick)
        self.sweeper = self.loop.call_later(1.0, self.sweep)

    def server_address(self, addr: bytes, port: bytes) -> tuple[str, int]:
        server = (addr.decode(), int(port))
        if len(self.servers) < MAX_CACHED_SERVERS:
            self.servers[addr + port] = server
        return server

    def reply(self, message: bytes) -> None:
        """Sends a ``D`` message; queues it when the control channel is full."""
        if self.control_broken:
            return
        if not self.replies:
            try:
                self.control.send(message)
                return
            except BlockingIOError:
                self.loop.add_writer(self.control_fd, self.send_replies)
            except OSError as exc:
                self.control_failed(exc)
                return
        self.replies.append(message)

    def send_replies(self) -> None:
        replies = self.replies
        while replies:
            try:
                self.control.send(replies[0])
            except BlockingIOError:
                return
            except OSError as exc:
                self.control_failed(exc)
                break
            replies.popleft()
        self.loop.remove_writer(self.control_fd)

    def control_failed(self, exc: OSError) -> None:
        """The core is gone: nothing more can be reported, and nothing more will come."""
        if not self.control_broken:
            self.control_broken = True
            log(f"control channel failed: {exc}")
        self.replies.clear()
        self.stop()

    async def flush_replies(self) -> None:
        """Waits, a little, for the core to take the last queued D messages."""
        deadline = self.loop.time() + REPLY_FLUSH_TIMEOUT
        while self.replies and self.loop.time() < deadline:
            await asyncio.sleep(0.01)


# The connection server subclasses HttpCycle, so it is imported once this module is complete.
if TYPE_CHECKING:
    from spawners.python import appmanager_python_http as httpconn
else:
    import appmanager_python_http as httpconn  # noqa: E402


def _split_target(target: bytes) -> tuple[str, bytes, bytes]:
    """A request target's path (percent-decoded, as text), raw path and query string, for an
    HTTP or WebSocket scope; an absolute-form target ("http://host/p") keeps only its path."""
    raw_path, _, query = target.partition(b"?")
    if raw_path[:1] != b"/":
        raw_path = handoff.absolute_form_path(raw_path)
    path = (unquote_to_bytes(raw_path) if b"%" in raw_path else raw_path).decode("utf-8", "replace")
    return path, raw_path, query
