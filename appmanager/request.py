"""Reading one HTTP/1.x request out of a connection's buffer: head, then body.

The core reads every request whole before it hands it to an app process
(``docs/protocol/handoff.md``), so a slow upload never pins an app process. A ``RequestReader``
lives for one request; the connection makes a new one for the next. Heads are parsed with httptools;
bodies are de-chunked here and kept in memory up to ``INLINE_LIMIT``, in an unlinked temporary file
beyond that.
"""

from __future__ import annotations

import os
import tempfile
from typing import IO

import httptools

MAX_HEAD = 8 * 1024
# Bodies up to this size travel inside the handoff message; a SEQPACKET message must fit in the
# socket's send buffer (about 200 KiB by default), so this stays well below it.
INLINE_LIMIT = 64 * 1024
MAX_BODY = 1024 * 1024 * 1024
MAX_CHUNK_LINE = 1024


class HttpError(Exception):
    """A request the core answers itself, without an app: ``status`` and a short reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Request:
    """One request, read whole: what the handoff message carries plus what routing needs.

    Lives from the moment its head is parsed until it is handed to a process (or answered).
    """

    __slots__ = (
        "head",
        "method",
        "path",
        "host",
        "keep_alive",
        "http11",
        "upgrade",
        "body",
        "body_file",
        "body_len",
        "connector",
    )

    def __init__(
        self,
        head: bytes,
        method: bytes,
        path: bytes,
        host: bytes,
        keep_alive: bool,
        http11: bool,
        upgrade: bool = False,
    ) -> None:
        self.head = head
        self.method = method
        self.path = path
        self.host = host
        self.keep_alive = keep_alive
        self.http11 = http11
        self.upgrade = upgrade
        self.body = b""
        self.body_file: IO[bytes] | None = None
        self.body_len = 0
        # The connector fields (``!~`` headers, docs/protocol/connector.md) by lowercase name,
        # already removed from ``head``; None when the request had none.
        self.connector: dict[bytes, bytes] | None = None

    def discard(self) -> None:
        """Release the body file, if any (the process has its own descriptor by then)."""
        if self.body_file is not None:
            self.body_file.close()
            self.body_file = None


class _HeadCallbacks:
    """Collects what httptools reports for one request head."""

    __slots__ = (
        "url",
        "content_length",
        "transfer_encoding",
        "expect",
        "host",
        "connection",
        "connector",
        "done",
    )

    def __init__(self) -> None:
        self.url = b""
        self.content_length: list[bytes] = []
        self.transfer_encoding: list[bytes] = []
        self.expect: bytes | None = None
        self.host = b""
        self.connection = b""
        self.connector: dict[bytes, bytes] | None = None
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"host":
            self.host = value
        elif lname == b"content-length":
            self.content_length.append(value)
        elif lname == b"transfer-encoding":
            self.transfer_encoding.append(value)
        elif lname == b"expect":
            self.expect = value
        elif lname == b"connection":
            self.connection += b"," + value.lower()
        elif lname[:2] == b"!~":
            if self.connector is None:
                self.connector = {}
            self.connector[lname] = value

    def on_headers_complete(self) -> None:
        self.done = True


class RequestReader:
    """Reads one request from a growing buffer; ``feed`` is called each time bytes arrive."""

    __slots__ = (
        "_spool_dir",
        "request",
        "send_continue",
        "_length",
        "_chunked",
        "_chunk_left",
        "_chunk_state",
        "_mem",
        "_file",
        "_received",
    )

    def __init__(self, spool_dir: str | None) -> None:
        self._spool_dir = spool_dir
        self.request: Request | None = None
        self.send_continue = False
        self._length = -1  # Content-Length, or -1 when chunked
        self._chunked = False
        self._chunk_left = 0
        self._chunk_state = 0  # 0 size line, 1 data, 2 CRLF after data, 3 trailers
        self._mem = bytearray()
        self._file: IO[bytes] | None = None
        self._received = 0

    def feed(self, buf: bytearray) -> int:
        """Consume what it can from ``buf``; return how many bytes were used.

        When the request is complete ``complete`` is True. Raises ``HttpError`` for a request the
        core
        must refuse.
        """
        used = 0
        if self.request is None:
            used = self.read_head(buf)
            if self.request is None:
                return used
        return used + self.read_body(buf, used)

    def read_body(self, buf: bytearray, used: int = 0) -> int:
        """Consume body bytes from ``buf`` starting at ``used``; return how many were used."""
        start = used
        if self._chunked:
            used += self._read_chunked(buf, used)
        elif self._received < self._length:
            take = min(self._length - self._received, len(buf) - used)
            if take:
                self._store(memoryview(buf)[used : used + take])
                used += take
        return used - start

    @property
    def has_body(self) -> bool:
        """Does the request announce a body (chunked, or a Content-Length above 0)?"""
        return self._chunked or self._length > 0

    @property
    def complete(self) -> bool:
        if self.request is None:
            return False
        if self._chunked:
            return self._chunk_state == 4
        return self._received >= self._length

    def finish(self) -> Request:
        """The complete request, with its body attached."""
        request = self.request
        assert request is not None and self.complete
        request.body_len = self._received
        if self._file is not None:
            self._file.flush()
            request.body_file = self._file
        else:
            request.body = bytes(self._mem)
        return request

    def close(self) -> None:
        """Drop a partly read request (the client went away or was refused)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def read_head(self, buf: bytearray) -> int:
        """Parse the head if ``buf`` holds all of it; return how many bytes it used (0 when more
        are needed, or only the empty lines before a request line)."""
        start = 0
        # RFC 9112 2.2: ignore empty lines before a request line (some clients send them
        # after a POST body).
        if buf[:2] == b"\r\n":
            while buf.startswith(b"\r\n", start):
                start += 2
        end = buf.find(b"\r\n\r\n", start, start + MAX_HEAD + 4)
        if end < 0:
            if len(buf) - start > MAX_HEAD:
                raise HttpError(431, "request header section too large")
            return start
        end += 4
        head = bytes(buf[start:end])
        callbacks = _HeadCallbacks()
        parser = httptools.HttpRequestParser(callbacks)
        upgrade = False
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            upgrade = True
        except httptools.HttpParserError as exc:
            self._check_framing(callbacks)
            raise HttpError(400, f"malformed request: {exc}") from None
        if not callbacks.done:
            raise HttpError(400, "malformed request head")
        self._check_framing(callbacks)
        http11 = parser.get_http_version() == "1.1"
        # httptools' should_keep_alive() is not reliable once the message is complete, so the
        # rule (RFC 9112 9.3) is applied here.
        if not callbacks.connection:
            keep_alive = http11
        else:
            tokens = {t.strip() for t in callbacks.connection.split(b",")}
            keep_alive = b"close" not in tokens if http11 else b"keep-alive" in tokens
        if callbacks.connector is not None:
            # Connector fields never reach an app: they are taken out of the head here, on every
            # listener, and only the connector socket's connections read them (front.py).
            head = _without_connector_fields(head)
        self.request = Request(
            head, parser.get_method(), callbacks.url, callbacks.host, keep_alive, http11, upgrade
        )
        self.request.connector = callbacks.connector
        if callbacks.transfer_encoding:
            self._chunked = True
        elif callbacks.content_length:
            self._length = _content_length(callbacks.content_length)
        else:
            self._length = 0
        if callbacks.expect is not None:
            if callbacks.expect.strip().lower() != b"100-continue":
                raise HttpError(417, "unsupported expectation")
            self.send_continue = http11 and (self._chunked or self._length > 0)
        return end

    @staticmethod
    def _check_framing(cb: _HeadCallbacks) -> None:
        if cb.transfer_encoding and cb.content_length:
            raise HttpError(400, "both Transfer-Encoding and Content-Length")
        if cb.transfer_encoding:
            codings = b",".join(cb.transfer_encoding).lower().replace(b" ", b"").split(b",")
            if codings != [b"chunked"]:
                raise HttpError(501, "unsupported transfer coding")

    def _read_chunked(self, buf: bytearray, pos: int) -> int:
        start = pos
        n = len(buf)
        while pos < n and self._chunk_state != 4:
            state = self._chunk_state
            if state == 1:
                take = min(self._chunk_left, n - pos)
                self._store(memoryview(buf)[pos : pos + take])
                pos += take
                self._chunk_left -= take
                if self._chunk_left == 0:
                    self._chunk_state = 2
                continue
            eol = buf.find(b"\r\n", pos, pos + MAX_CHUNK_LINE)
            if eol < 0:
                if n - pos > MAX_CHUNK_LINE:
                    raise HttpError(400, "chunk line too long")
                break
            line = bytes(buf[pos:eol])
            pos = eol + 2
            if state == 0:
                size_text = line.split(b";", 1)[0].strip()
                try:
                    if not size_text or size_text.startswith((b"-", b"+", b"0x", b"0X")):
                        raise ValueError
                    size = int(size_text, 16)
                except ValueError:
                    raise HttpError(400, "malformed chunk size") from None
                if self._received + size > MAX_BODY:
                    raise HttpError(413, "request body too large")
                if size == 0:
                    self._chunk_state = 3
                else:
                    self._chunk_left = size
                    self._chunk_state = 1
            elif state == 2:
                if line:
                    raise HttpError(400, "malformed chunk terminator")
                self._chunk_state = 0
            elif not line:  # state 3: trailer fields end with an empty line
                self._chunk_state = 4
        return pos - start

    def _store(self, data: memoryview) -> None:
        self._received += len(data)
        if self._file is None and len(self._mem) + len(data) <= INLINE_LIMIT:
            self._mem += data
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self._spool_dir)  # noqa: SIM115 (lives with the request)
            self._file.write(self._mem)
            self._mem = bytearray()
        self._file.write(data)


def _without_connector_fields(head: bytes) -> bytes:
    """The head without ``!~`` fields, and without the connection headers of whoever sent them:
    a web server's ``Connection: Keep-Alive`` to the core (mod_proxy always writes one) is not
    the client's, and the app must not see it."""
    lines = head.split(b"\r\n")
    return b"\r\n".join(
        line
        for line in lines
        if not line.startswith(b"!~") and line.split(b":", 1)[0].lower() not in _HOP_BY_HOP
    )


_HOP_BY_HOP = frozenset((b"connection", b"keep-alive"))


def _content_length(values: list[bytes]) -> int:
    if len(set(values)) != 1:
        raise HttpError(400, "conflicting Content-Length headers")
    text = values[0].strip()
    if not text.isdigit():
        raise HttpError(400, "malformed Content-Length")
    length = int(text)
    if length > MAX_BODY:
        raise HttpError(413, "request body too large")
    return length


def body_fd(request: Request) -> int | None:
    """The descriptor of the request's body file, rewound, or None for an inline body."""
    if request.body_file is None:
        return None
    fd = request.body_file.fileno()
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
