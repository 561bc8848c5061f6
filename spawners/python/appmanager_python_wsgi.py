"""The Python shim's WSGI server: PEP 3333 apps, one request at a time.

Each request arrives on the control channel together with the client connection's descriptor
(docs/protocol/handoff.md); the server runs the app, writes the response straight to the client,
blocking on poll when the client is slow, and reports back with ``D <seq> <k|c> <status>
<bytes>`` (the status and body size for the access log, left out when no response began). Loaded by
``appmanager_python.py`` once the app is known to be a WSGI app.
"""

from __future__ import annotations

import errno
import io
import os
import select
import signal
import socket
import stat
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

if TYPE_CHECKING:
    # Run as a script, the shim imports its modules from its own directory; mypy, run from the
    # repository root, knows them by their package path.
    from spawners.python import appmanager_python_handoff as handoff
else:
    import appmanager_python_handoff as handoff

SERVER_SOFTWARE = "appmanager"
# poll(2) takes milliseconds.
WRITE_TIMEOUT_MS = int(handoff.WRITE_TIMEOUT * 1000)
# Header names are few and repeat; their environ keys are cached, up to this many.
MAX_CACHED_HEADER_NAMES = 1000

# sendfile(2) errors that mean "not for this file", not "the client went away".
_NO_SENDFILE = frozenset((errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP))

WSGIEnviron = dict[str, Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
WriteCallable = Callable[[bytes], None]
StartResponse = Callable[..., WriteCallable]
WSGIApp = Callable[[WSGIEnviron, StartResponse], Iterable[bytes]]

ClientDisconnected = handoff.ClientDisconnected
ProtocolError = handoff.ProtocolError
log = handoff.log
_pack_seq = handoff.pack_seq
# Bound once: module attribute lookups add up on the per-request path.
_ANCILLARY_SIZE = handoff.ANCILLARY_SIZE
_RECV_FLAGS = handoff.RECV_FLAGS
_received_fds = handoff.received_fds
_read_request = handoff.read_request

_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}
_SCHEMES = {b"http": "http", b"https": "https"}
# Response headers the shim owns: framing and connection management are its job, not the app's.
_HOP_BY_HOP = frozenset(("connection", "keep-alive", "transfer-encoding"))
_SPECIAL_RESPONSE_HEADERS = _HOP_BY_HOP | {"content-length", "date"}


class _Stop(BaseException):
    """Raised by the SIGTERM handler to leave a blocking receive; never escapes ``Worker.serve``."""


class ClientConnection:
    """The shim's copy of a client connection's descriptor, written with waits on poll.

    The descriptor is non-blocking and its flags are shared with the core's copy, so it stays
    non-blocking: a full socket buffer shows up as BlockingIOError and the shim polls for POLLOUT.
    Plain os.write rather than a socket object: one syscall per write on the fast path (a socket in
    timeout mode polls before every send) and no object to build and detach per request.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> None:
        """Writes all of ``data``; raises OSError (TimeoutError when the client stops reading)."""
        try:
            sent = os.write(self.fd, data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)
        while sent < len(view):
            self.wait_writable()
            try:
                sent += os.write(self.fd, view[sent:])
            except BlockingIOError:
                continue  # poll may say writable when the buffer is still too full

    def sendfile(self, file_fd: int, offset: int, count: int) -> int:
        """Sends ``count`` bytes of a regular file from ``offset``; returns how many were sent,
        fewer when the file turned out shorter."""
        total = 0
        while total < count:
            try:
                sent = os.sendfile(self.fd, file_fd, offset + total, count - total)
            except BlockingIOError:
                self.wait_writable()
                continue
            except OSError as exc:
                if total or exc.errno not in _NO_SENDFILE:
                    raise
                return self.copy_file(file_fd, offset, count)
            if sent == 0:
                break
            total += sent
        return total

    def copy_file(self, file_fd: int, offset: int, count: int) -> int:
        """sendfile's fallback, for files that cannot be sent directly: pread and write."""
        total = 0
        while total < count:
            block = os.pread(file_fd, min(count - total, 1 << 20), offset + total)
            if not block:
                break
            self.write(block)
            total += len(block)
        return total

    def wait_writable(self) -> None:
        """Waits until the client can take more bytes, at most WRITE_TIMEOUT_MS."""
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        if not poller.poll(WRITE_TIMEOUT_MS):
            raise TimeoutError(f"client read nothing for {WRITE_TIMEOUT_MS // 1000} s")


class BodyFileReader(io.RawIOBase):
    """Raw reads of the first ``length`` bytes of a body file, by pread from offset 0.

    pread leaves the descriptor's offset alone: SCM_RIGHTS passes the core's open file description,
    offset included. The descriptor belongs to the Worker, which closes it after the request;
    close() here only makes later reads fail instead of reading a reused descriptor.
    """

    def __init__(self, fd: int, length: int) -> None:
        super().__init__()
        self._fd = fd
        self._pos = 0
        self._length = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._checkClosed()
        left = self._length - self._pos
        if left <= 0:
            return 0
        view = memoryview(buffer).cast("B")
        n = os.preadv(self._fd, [view[:left] if len(view) > left else view], self._pos)
        self._pos += n
        return n

    def readall(self) -> bytes:
        # One pread for the rest rather than RawIOBase's 8 KiB steps.
        self._checkClosed()
        data = os.pread(self._fd, max(self._length - self._pos, 0), self._pos)
        self._pos += len(data)
        return data


def body_reader(fd: int, length: int) -> io.BufferedReader:
    """wsgi.input for a body in a file: read, readline, readlines and iteration, never past it."""
    return io.BufferedReader(BodyFileReader(fd, length), 64 * 1024)


class FileWrapper:
    """wsgi.file_wrapper: an app returns ``FileWrapper(file)`` so that a regular file is sent with
    sendfile(2); anything else is read in blocks of ``blksize``."""

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = blksize

    def __iter__(self) -> Iterator[bytes]:
        read = self.filelike.read
        while True:
            block = read(self.blksize)
            if not block:
                return
            yield block

    def close(self) -> None:
        close = getattr(self.filelike, "close", None)
        if close is not None:
            close()


class Response:
    """One response on its way to the client: what start_response set and what has been sent.

    Lives for one request. Headers go out lazily, with the first non-empty body chunk or at the
    end. Invariants: once ``headers_sent`` is true, status and headers never change and
    ``chunked`` and ``remaining`` describe the framing; ``keep_alive`` only goes from true to
    false; ``sent`` is -1 until the head has been written, then the body bytes written since.
    """

    __slots__ = (
        "conn",
        "seq",
        "progress_fd",
        "date",
        "is_head",
        "http11",
        "client_keepalive",
        "keep_alive",
        "status",
        "headers",
        "content_length",
        "has_date",
        "bodiless",
        "headers_sent",
        "chunked",
        "remaining",
        "finished",
        "sent",
    )

    def __init__(
        self,
        conn: ClientConnection,
        seq: int,
        progress_fd: int,
        date: handoff.DateHeader,
        is_head: bool,
        http11: bool,
        client_keepalive: bool,
        keep_alive: bool,
    ) -> None:
        self.conn = conn
        self.seq = seq
        self.progress_fd = progress_fd
        self.date = date
        self.is_head = is_head
        self.http11 = http11
        # An HTTP/1.0 client asked for keep-alive; it only keeps the connection if told so.
        self.client_keepalive = client_keepalive
        # Whether the connection may stay open; start_response and the framing can only lower it.
        self.keep_alive = keep_alive
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self.has_date = False
        self.bodiless = is_head
        self.headers_sent = False
        self.chunked = False
        # Bytes of the app's Content-Length still to send; None when the length is not the app's.
        self.remaining: int | None = None
        self.finished = False
        # Body bytes written, for the access log (D); -1 until the head went out.
        self.sent = -1

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: ExcInfo | None = None,
    ) -> WriteCallable:
        """The start_response callable (PEP 3333), exc_info semantics included."""
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # breaks the frame -> traceback -> frame cycle
        elif self.status is not None:
            raise RuntimeError("start_response() called a second time without exc_info")
        self._set(status, headers)
        return self.write

    def _set(self, status: str, headers: list[tuple[str, str]]) -> None:
        """Validates and takes the status and headers; raises before anything is stored."""
        if (
            type(status) is not str
            or len(status) < 4
            or status[3] != " "
            or not status[:3].isdigit()
            or "\n" in status
            or "\r" in status
        ):
            raise ValueError(f"invalid WSGI status {status!r}; expected e.g. '200 OK'")
        content_length = None
        has_date = False
        keep_alive = self.keep_alive
        special = False
        for name, value in headers:
            if type(name) is not str or type(value) is not str:
                raise TypeError(f"response header {name!r}: {value!r} is not a pair of str")
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name or ":" in name:
                raise ValueError(f"response header {name!r}: {value!r} holds CR, LF or ':'")
            lower = name.lower()
            if lower not in _SPECIAL_RESPONSE_HEADERS:
                continue
            special = True
            if lower == "content-length":
                if not value.strip().isdigit():
                    raise ValueError(f"invalid Content-Length {value!r}")
                content_length = int(value)
            elif lower == "date":
                has_date = True
            elif lower == "connection" and "close" in value.lower():
                keep_alive = False
        if special:
            headers = [(n, v) for n, v in headers if n.lower() not in _HOP_BY_HOP]
        self.status = status
        self.headers = headers
        self.content_length = content_length
        self.has_date = has_date
        self.keep_alive = keep_alive
        # 1xx, 204 and 304 responses have no body, whatever the app yields.
        self.bodiless = self.is_head or status[0] == "1" or status[:3] in ("204", "304")

    def _head(self, framing: str) -> bytes:
        """The status line and headers, ``framing`` (a Content-Length or Transfer-Encoding line,
        or "") included; the Connection header follows ``keep_alive``."""
        if self.status is None:
            raise RuntimeError("the app returned a body without calling start_response()")
        lines = [f"HTTP/1.1 {self.status}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in self.headers]
        if not self.has_date:
            lines.append(self.date.line())
        if framing:
            lines.append(framing)
        if not self.keep_alive:
            lines.append("Connection: close\r\n")
        elif not self.http11 and self.client_keepalive:
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def _send_first(self, data: bytes, count: int) -> None:
        """Writes the head, and ``count`` body bytes with it; records progress first."""
        # handoff.md: the core reads this only if the process dies holding the request.
        os.pwrite(self.progress_fd, _pack_seq(self.seq), 0)
        self.headers_sent = True
        try:
            self.conn.write(data)
        except OSError as exc:
            self.keep_alive = False
            raise ClientDisconnected(f"writing the response failed: {exc}") from exc
        self.sent = count

    def _send(self, data: bytes, count: int) -> None:
        """Writes more of the response, ``count`` bytes of body among ``data``."""
        try:
            self.conn.write(data)
        except OSError as exc:
            self.keep_alive = False
            raise ClientDisconnected(f"writing the response failed: {exc}") from exc
        self.sent += count

    def status_code(self) -> int:
        """The status code of the response sent (its head went out)."""
        return int(self.status[:3]) if self.status else 0

    def send_whole(self, body: bytes) -> None:
        """Sends a response whose body is known in full: headers and body in one write."""
        if self.bodiless:
            # HEAD: a Content-Length the body gives is what GET would send; an empty one says
            # nothing (the app may skip the body for HEAD). 1xx/204/304 never get one.
            framing = (
                f"Content-Length: {len(body)}\r\n"
                if self.is_head and body and self.content_length is None
                else ""
            )
            self._send_first(self._head(framing), 0)
        elif self.content_length is None:
            self._send_first(self._head(f"Content-Length: {len(body)}\r\n") + body, len(body))
        else:
            if len(body) < self.content_length:
                self.keep_alive = False  # the client will wait for bytes that never come
            body = body[: self.content_length]
            self._send_first(self._head("") + body, len(body))
        self.finished = True

    def write(self, data: bytes) -> None:
        """The write() callable, and the path of every chunk of a streamed body."""
        if not isinstance(data, bytes):
            raise TypeError(f"response body chunks must be bytes, not {type(data).__name__}")
        if not self.headers_sent:
            if self.status is None:
                raise RuntimeError("write() called before start_response()")
            if data:
                self._start_stream(data)
            return
        if self.bodiless or not data:
            return
        if self.chunked:
            self._send(b"%x\r\n%b\r\n" % (len(data), data), len(data))
        elif self.remaining is not None:
            if self.remaining > 0:
                data = data[: self.remaining]
                self.remaining -= len(data)
                self._send(data, len(data))
        else:
            self._send(data, len(data))

    def _start_stream(self, first: bytes) -> None:
        """Sends the headers with the first chunk of a body of not-yet-known length."""
        if self.bodiless:
            self._send_first(self._head(""), 0)
        elif self.content_length is not None:
            first = first[: self.content_length]
            self.remaining = self.content_length - len(first)
            self._send_first(self._head("") + first, len(first))
        elif self.http11:
            self.chunked = True
            framing = "Transfer-Encoding: chunked\r\n"
            chunk = b"%x\r\n%b\r\n" % (len(first), first)
            self._send_first(self._head(framing) + chunk, len(first))
        else:
            # HTTP/1.0 cannot chunk: the body ends where the connection does.
            self.keep_alive = False
            self._send_first(self._head("") + first, len(first))

    def finish(self) -> None:
        """Ends a streamed body: the last chunk, or the headers when every chunk was empty."""
        if not self.headers_sent:
            self.send_whole(b"")
            return
        if self.chunked:
            self._send(b"0\r\n\r\n", 0)
        elif self.remaining:
            self.keep_alive = False
        self.finished = True

    def send_file(self, wrapper: FileWrapper) -> bool:
        """Sends a regular file with sendfile(2); False, having sent nothing, when it is not one."""
        filelike = wrapper.filelike
        if self.headers_sent or self.status is None or (self.bodiless and not self.is_head):
            return False
        if "b" not in getattr(filelike, "mode", "b"):
            return False
        try:
            fd = filelike.fileno()
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return False
            position = filelike.tell() if hasattr(filelike, "tell") else os.lseek(fd, 0, 1)
        except (AttributeError, OSError, ValueError):
            return False
        size = max(st.st_size - position, 0)
        count = size if self.content_length is None else min(size, self.content_length)
        framing = f"Content-Length: {size}\r\n" if self.content_length is None else ""
        self._send_first(self._head(framing), 0)
        if self.is_head or count == 0:
            self.finished = True
            return True
        try:
            sent = self.conn.sendfile(fd, position, count)
        except OSError as exc:
            self.keep_alive = False
            raise ClientDisconnected(f"sending the file failed: {exc}") from exc
        self.sent = sent
        if sent < (size if self.content_length is None else self.content_length):
            self.keep_alive = False  # the file shrank under us; the length we announced is a lie
        self.finished = True
        return True


class Worker:
    """Serves requests from the control channel, one at a time, for the life of the process.

    Created in step LOAD_APP once the app is loaded; lives until EOF on the control channel or
    SIGTERM. Owns the descriptors that come with each request and closes them when the request
    is answered; between requests it keeps only the receive buffer and caches.
    """

    # READY's "concurrency": one request at a time.
    concurrency = 1
    # Requests only (Q): whole connections are for processes that serve many at once.
    takes_connections = False

    def __init__(
        self,
        control: socket.socket,
        progress_fd: int,
        app: WSGIApp,
        base_uri: str,
        development: bool,
    ) -> None:
        self.control = control
        self.progress_fd = progress_fd
        self.app = app
        self.development = development
        # "/" or "/app/" mean the same mount point as "" and "/app".
        self.base_uri = base_uri.rstrip("/")
        self.buffer = bytearray(handoff.MAX_MESSAGE)
        self.view = memoryview(self.buffer)
        self.date = handoff.DateHeader()
        self.header_keys: dict[bytes, str] = {}
        self.base_environ: WSGIEnviron = {
            "SCRIPT_NAME": self.base_uri,
            "SERVER_SOFTWARE": SERVER_SOFTWARE,
            "wsgi.version": (1, 0),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            "wsgi.file_wrapper": FileWrapper,
        }
        self.idle = False
        self.stopping = False

    def startup(self) -> None:
        """The app's start-up before READY: a WSGI app has none beyond its import."""

    def serve(self) -> None:
        """Takes requests until EOF on the control channel or SIGTERM; a TERM during a request
        lets the request finish."""
        try:
            while True:
                # idle goes up before stopping is checked, so a TERM between the two still stops
                # us. Python runs handlers between bytecodes: a TERM that lands after the check
                # but just before the receive blocks waits for the next message or EOF. A TERM
                # right after the receive returns loses that request; the core sees the process
                # die holding it with no progress recorded, and answers 502.
                self.idle = True
                if self.stopping:
                    return
                nbytes, ancdata, msg_flags, _ = self.control.recvmsg_into(
                    [self.buffer], _ANCILLARY_SIZE, _RECV_FLAGS
                )
                self.idle = False
                if nbytes == 0:
                    return
                fds = _received_fds(ancdata)
                try:
                    reply = self.handle(nbytes, msg_flags, fds)
                finally:
                    for fd in fds:
                        os.close(fd)
                if reply:
                    self.control.send(reply)
        except _Stop:
            return
        except OSError as exc:
            # The core is gone; nothing left to serve.
            log(f"control channel failed: {exc}")

    def listen(self) -> None:
        """Step LISTEN: the signal handling serving needs, in place before READY goes out."""
        signal.signal(signal.SIGTERM, self._on_sigterm)
        # An app may have set SIGPIPE back to its default, which would kill us on a client reset.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """Stops at once when idle; otherwise after the current request is answered."""
        self.stopping = True
        if self.idle:
            raise _Stop

    def handle(self, nbytes: int, msg_flags: int, fds: list[int]) -> bytes:
        """Serves one ``Q`` message; returns the ``D`` reply, or b"" when it has no ``seq``. The
        reply carries the status and body size when the response began."""
        try:
            request = _read_request(self.buffer, self.view, nbytes, msg_flags, len(fds))
        except ProtocolError as exc:
            seq = handoff.request_seq(self.view, nbytes)
            if seq is None:
                log(f"ignoring unreadable control message {bytes(self.view[:80])!r}")
                return b""
            log(f"request {seq}: protocol error: {exc}")
            return b"D %d c" % seq
        seq = request[0]
        try:
            response = self.serve_request(request, fds)
        except ProtocolError as exc:
            log(f"request {seq}: protocol error: {exc}")
            return b"D %d c" % seq
        except Exception:
            # App errors are handled in run_app; this is the shim's own failure (a bad progress
            # descriptor, say). The process can go on; this connection cannot.
            log(f"request {seq}: internal error:\n{traceback.format_exc()}")
            return b"D %d c" % seq
        keep = b"k" if response.keep_alive and response.finished else b"c"
        if response.sent < 0:
            return b"D %d %b" % (seq, keep)
        return b"D %d %b %d %d" % (seq, keep, response.status_code(), response.sent)

    def serve_request(self, request: handoff.Request, fds: list[int]) -> Response:
        """Runs the app on a request; returns its response, as far as it went."""
        (
            seq,
            flags,
            raddr,
            rport,
            saddr,
            sport,
            scheme,
            head,
            inline_body,
            body_len,
            body_in_file,
        ) = request
        environ, is_head, http11, client_close, client_keepalive = self.environ(head, body_len)
        environ["REMOTE_ADDR"] = raddr.decode("latin-1")
        environ["REMOTE_PORT"] = rport.decode("latin-1")
        environ["SERVER_NAME"] = saddr.decode("latin-1")
        environ["SERVER_PORT"] = sport.decode("latin-1")
        environ["wsgi.url_scheme"] = _SCHEMES.get(scheme) or scheme.decode("latin-1")
        if body_in_file:
            body: io.BufferedIOBase = body_reader(fds[1], body_len)
        else:
            body = io.BytesIO(inline_body)
        environ["wsgi.input"] = body

        # An upgrade (U) is served as a plain request: this server never takes the connection
        # over, and handoff.md has the core close it after the D.
        keep_alive = (
            b"K" in flags
            and b"U" not in flags
            and not client_close
            and (http11 or client_keepalive)
        )
        response = Response(
            ClientConnection(fds[0]),
            seq,
            self.progress_fd,
            self.date,
            is_head,
            http11,
            client_keepalive,
            keep_alive,
        )
        try:
            self.run_app(environ, response)
        finally:
            body.close()
        return response

    def environ(self, head: bytes, body_len: int) -> tuple[WSGIEnviron, bool, bool, bool, bool]:
        """Builds the environ from the request head; also returns, for the response: is it HEAD,
        is it HTTP/1.1, did the client ask to close, did an HTTP/1.0 client ask for keep-alive."""
        # Split on LF and strip CR from what matters: CRLF is standard, a bare LF costs nothing.
        lines = head.split(b"\n")
        try:
            method, target, version = lines[0].split()
        except ValueError:
            raise ProtocolError(f"unreadable request line {lines[0][:80]!r}") from None

        environ = self.base_environ.copy()
        environ["REQUEST_METHOD"] = _METHODS.get(method) or method.decode("latin-1")
        environ["REQUEST_URI"] = target.decode("latin-1")
        if version == b"HTTP/1.1":
            environ["SERVER_PROTOCOL"] = "HTTP/1.1"
        elif version == b"HTTP/1.0":
            environ["SERVER_PROTOCOL"] = "HTTP/1.0"
        else:
            environ["SERVER_PROTOCOL"] = version.decode("latin-1")
        path, _, query = target.partition(b"?")
        if path[:1] != b"/":
            path = handoff.absolute_form_path(path)
        environ["PATH_INFO"] = self.path_info(path)
        environ["QUERY_STRING"] = query.decode("latin-1")

        keys = self.header_keys
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                continue
            key = keys.get(name)
            if key is None:
                key = self.environ_key(name)
            if not key:
                continue
            text = value.strip().decode("latin-1")
            if key in environ:
                separator = "; " if key == "HTTP_COOKIE" else ", "
                environ[key] = environ[key] + separator + text
            else:
                environ[key] = text

        # The core de-chunked the body; its length is body_len, whatever the head says.
        chunked = environ.pop("HTTP_TRANSFER_ENCODING", None)
        if body_len or chunked is not None or "CONTENT_LENGTH" in environ:
            environ["CONTENT_LENGTH"] = str(body_len)

        client_close = client_keepalive = False
        connection = environ.get("HTTP_CONNECTION")
        if connection:
            client_close, client_keepalive = handoff.connection_tokens(connection)
        http11 = version == b"HTTP/1.1"
        return environ, method == b"HEAD", http11, client_close, client_keepalive

    def path_info(self, path: bytes) -> str:
        """PATH_INFO: the path percent-decoded, as latin-1 (PEP 3333), without the base URI."""
        decoded = (unquote_to_bytes(path) if b"%" in path else path).decode("latin-1")
        base = self.base_uri
        if base and decoded.startswith(base) and decoded[len(base) : len(base) + 1] in ("", "/"):
            return decoded[len(base) :]
        return decoded

    def environ_key(self, name: bytes) -> str:
        """The environ key for a request header name, or "" to drop the header."""
        key = ""
        # Names with "_" would collide with the "-" spelling once mapped (header smuggling), and
        # whitespace in a name is never valid; nginx and gunicorn drop both too.
        if name and not any(c in name for c in (b"_", b" ", b"\t", b"\r")):
            key = name.decode("latin-1").upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
        if len(self.header_keys) < MAX_CACHED_HEADER_NAMES:
            self.header_keys[name] = key
        return key

    def run_app(self, environ: WSGIEnviron, response: Response) -> None:
        """Calls the app and sends what it returns; errors become a 500 page or a closed
        connection, and the iterable's close() is always called."""
        try:
            result = self.app(environ, response.start_response)
            try:
                self.send_result(result, response)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception as exc:
            self.app_failed(exc, environ, response)

    def send_result(self, result: Iterable[bytes], response: Response) -> None:
        """Sends the app's iterable, taking the cheapest path its type allows."""
        kind = type(result)
        if (kind is list or kind is tuple) and not response.headers_sent:
            # The hot path: the whole body is known, so one write carries headers and body.
            response.send_whole(b"".join(result))
            return
        if isinstance(result, FileWrapper) and response.send_file(result):
            return
        for chunk in result:
            response.write(chunk)
            if response.bodiless and response.headers_sent:
                break  # HEAD, 204, 304: the rest would be thrown away; don't wait for it
        response.finish()

    def app_failed(self, exc: Exception, environ: WSGIEnviron, response: Response) -> None:
        """Answers 500 when nothing was sent yet; otherwise the connection must close."""
        if isinstance(exc, ClientDisconnected):
            response.keep_alive = False
            return
        request = f"{environ.get('REQUEST_METHOD')} {environ.get('REQUEST_URI')}"
        text = "".join(traceback.format_exception(exc))
        log(f"error in request {response.seq} ({request}):\n{text}")
        if response.headers_sent:
            if not response.finished:
                response.keep_alive = False
            return
        response.status = None
        try:
            response.start_response(
                "500 Internal Server Error", [("Content-Type", "text/html; charset=utf-8")]
            )
            response.send_whole(handoff.error_page(text, self.development))
        except ClientDisconnected:
            response.keep_alive = False
