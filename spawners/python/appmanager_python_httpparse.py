"""HTTP/1.x request parsing for the ASGI server's connections (``appmanager_python_http.py``).

``new_parser`` gives httptools' parser when the app's Python has httptools (as uvicorn's default
does), and otherwise ``RequestParser``, a pure-Python parser with the same interface: the shim
itself needs only the standard library. ``APPMANAGER_PYTHON_HTTP_PARSER=python`` in the
environment forces the pure-Python one (the tests run both).

The interface, as httptools has it: ``feed_data(data)`` parses what arrived and calls the
callbacks object's ``on_message_begin()``, ``on_url(bytes)``, ``on_header(name, value)`` (also for
trailer fields, after ``on_headers_complete``), ``on_headers_complete()``, ``on_body(bytes)`` and
``on_message_complete()``; it raises one of ``PARSE_ERRORS`` for a malformed request, after
which the parser is spent, or one of ``UPGRADES`` for a request that switches protocols (an
``Upgrade`` with ``Connection: upgrade``, or ``CONNECT``), once its message is complete, with the
offset in ``data`` where the new protocol's bytes begin as its first argument.
``get_method()``, ``get_http_version()`` and ``should_upgrade()`` describe the request whose head
was parsed last.
"""

from __future__ import annotations

import os
import re
from typing import Any, Protocol

# Forces the pure-Python parser even where httptools is installed (then it is not even imported).
PARSER_ENV = "APPMANAGER_PYTHON_HTTP_PARSER"

try:
    if os.environ.get(PARSER_ENV) == "python":
        raise ImportError(f"{PARSER_ENV}=python")
    import httptools
except ImportError:  # the app's Python may lack it: the pure-Python parser serves instead
    httptools = None  # type: ignore[assignment]
# A chunk-size line (with its extensions) longer than this is refused, as the core does.
MAX_CHUNK_LINE = 1024
# The pure-Python parser refuses a head that is still incomplete after this many bytes; the
# connection refuses smaller ones (431) from what the callbacks report.
MAX_BUFFERED_HEAD = 64 * 1024


class ParseError(Exception):
    """The request is malformed (the pure-Python parser's; httptools raises its own)."""


class HeadTooLarge(ParseError):
    """A head (or trailer section) still incomplete after MAX_BUFFERED_HEAD bytes: 431."""


class Upgrade(Exception):  # noqa: N818 - named as httptools' HttpParserUpgrade is, minus the prefix
    """The request switches protocols; ``args[0]`` is where its bytes begin in the data fed."""


class Parser(Protocol):
    """What the connection needs of a parser, httptools' or ``RequestParser``."""

    def feed_data(self, data: bytes | bytearray | memoryview) -> None: ...

    def get_method(self) -> bytes: ...

    def get_http_version(self) -> str: ...

    def should_upgrade(self) -> bool: ...


if httptools is not None:
    PARSE_ERRORS: tuple[type[Exception], ...] = (ParseError, httptools.HttpParserError)
    UPGRADES: tuple[type[Exception], ...] = (Upgrade, httptools.HttpParserUpgrade)
else:
    PARSE_ERRORS = (ParseError,)
    UPGRADES = (Upgrade,)


def new_parser(callbacks: Any) -> Parser:
    """A parser for one connection's requests, reporting to ``callbacks``."""
    if httptools is not None:
        parser: Parser = httptools.HttpRequestParser(callbacks)
        return parser
    return RequestParser(callbacks)


# RFC 9110 5.6.2: a token (method, field name).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e\x80-\xff]+) HTTP/(\d\.\d)")
# Control characters other than tab may not appear in a field value.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEX = re.compile(rb"[0-9A-Fa-f]+")

# RequestParser's states.
_HEAD = 0  # before or inside a request head
_LENGTH = 1  # a body of known length
_CHUNK_SIZE = 2  # a chunk-size line
_CHUNK_DATA = 3  # a chunk's data
_CHUNK_END = 4  # the CRLF after a chunk's data
_TRAILERS = 5  # trailer fields after the last chunk
_DEAD = 6  # after an error or an upgrade: nothing more is parsed


class RequestParser:
    """A pure-Python HTTP/1.x request parser with httptools' interface (module docstring).

    Lives as long as its connection and parses its requests one after the other. Invariant:
    ``buffer`` holds the bytes fed and not yet consumed, which only ever are the start of a head,
    of a chunk-size line, of a chunk's closing CRLF or of a trailer section (body bytes are
    handed on as they come).
    """

    __slots__ = (
        "callbacks",
        "buffer",
        "state",
        "began",
        "method",
        "version",
        "upgrade",
        "remaining",
    )

    def __init__(self, callbacks: Any) -> None:
        self.callbacks = callbacks
        self.buffer = bytearray()
        self.state = _HEAD
        self.began = False
        self.method = b""
        self.version = ""
        self.upgrade = False
        # Body bytes of the current message (or chunk) still to come.
        self.remaining = 0

    def get_method(self) -> bytes:
        return self.method

    def get_http_version(self) -> str:
        return self.version

    def should_upgrade(self) -> bool:
        return self.upgrade

    def feed_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.state == _DEAD:
            raise ParseError("the parser stopped at an earlier error or upgrade")
        buffer = self.buffer
        # Where ``data`` starts in the buffer: the Upgrade offset is counted from there.
        base = len(buffer)
        buffer += data
        try:
            pos = self.parse(0, base)
        except ParseError:
            self.state = _DEAD
            raise
        del buffer[:pos]

    def parse(self, pos: int, base: int) -> int:
        """Parses the buffer from ``pos`` as far as it goes; returns the position reached."""
        buffer = self.buffer
        callbacks = self.callbacks
        while pos < len(buffer):
            state = self.state
            if state == _HEAD:
                if not self.began:
                    # RFC 9112 2.2: empty lines before a request line are ignored.
                    while buffer.startswith(b"\r\n", pos):
                        pos += 2
                    if pos >= len(buffer) or (pos == len(buffer) - 1 and buffer[pos] == 0x0D):
                        break  # nothing yet, or a CR whose LF is still to come
                    self.began = True
                    callbacks.on_message_begin()
                end = buffer.find(b"\r\n\r\n", pos)
                if end < 0:
                    if len(buffer) - pos > MAX_BUFFERED_HEAD:
                        raise HeadTooLarge("request head too large")
                    break
                self.head(bytes(buffer[pos:end]))
                pos = end + 4
                self.began = False
                if self.upgrade or self.method == b"CONNECT":
                    callbacks.on_message_complete()
                    self.state = _DEAD
                    raise Upgrade(pos - base)
                if self.state == _HEAD:
                    callbacks.on_message_complete()
            elif state in (_LENGTH, _CHUNK_DATA):
                take = min(self.remaining, len(buffer) - pos)
                callbacks.on_body(bytes(buffer[pos : pos + take]))
                pos += take
                self.remaining -= take
                if not self.remaining:
                    if state == _LENGTH:
                        self.state = _HEAD
                        callbacks.on_message_complete()
                    else:
                        self.state = _CHUNK_END
            elif state == _CHUNK_SIZE:
                end = buffer.find(b"\r\n", pos, pos + MAX_CHUNK_LINE)
                if end < 0:
                    if len(buffer) - pos >= MAX_CHUNK_LINE:
                        raise ParseError("chunk-size line too long")
                    break
                size = buffer[pos:end].split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size):
                    raise ParseError("invalid chunk size")
                pos = end + 2
                self.remaining = int(size, 16)
                self.state = _CHUNK_DATA if self.remaining else _TRAILERS
            elif state == _CHUNK_END:
                if len(buffer) - pos < 2:
                    break
                if buffer[pos : pos + 2] != b"\r\n":
                    raise ParseError("chunk data not followed by CRLF")
                pos += 2
                self.state = _CHUNK_SIZE
            else:  # _TRAILERS: fields up to an empty line, reported as headers (as httptools)
                end = buffer.find(b"\r\n", pos)
                if end < 0:
                    if len(buffer) - pos > MAX_BUFFERED_HEAD:
                        raise HeadTooLarge("trailer section too large")
                    break
                line = bytes(buffer[pos:end])
                pos = end + 2
                if line:
                    name, value = _field(line)
                    callbacks.on_header(name, value)
                else:
                    self.state = _HEAD
                    callbacks.on_message_complete()
        return pos

    def head(self, head: bytes) -> None:
        """Parses a whole head (without its final CRLF CRLF), reports it, and sets the state for
        the body."""
        callbacks = self.callbacks
        lines = head.split(b"\r\n")
        match = _REQUEST_LINE.fullmatch(lines[0])
        if match is None:
            raise ParseError(f"malformed request line {lines[0][:80]!r}")
        self.method = match.group(1)
        self.version = match.group(3).decode()
        callbacks.on_url(match.group(2))
        lengths: list[bytes] = []
        codings: list[bytes] = []
        connection: list[bytes] = []
        upgrade = False
        for line in lines[1:]:
            name, value = _field(line)
            lower = name.lower()
            if lower == b"content-length":
                lengths.append(value)
            elif lower == b"transfer-encoding":
                codings += (c.strip(b" \t").lower() for c in value.split(b","))
            elif lower == b"connection":
                connection += (t.strip(b" \t").lower() for t in value.split(b","))
            elif lower == b"upgrade":
                upgrade = True
            callbacks.on_header(name, value)
        self.upgrade = upgrade and b"upgrade" in connection
        if codings:
            if lengths:
                raise ParseError("Transfer-Encoding can't be present with Content-Length")
            if codings[-1] != b"chunked":
                raise ParseError("invalid Transfer-Encoding")
            self.state = _CHUNK_SIZE
        elif lengths:
            if len(set(lengths)) > 1 or not lengths[0].isdigit():
                raise ParseError("invalid Content-Length")
            self.remaining = int(lengths[0])
            self.state = _LENGTH if self.remaining else _HEAD
        else:
            self.state = _HEAD
        callbacks.on_headers_complete()
        if self.upgrade or self.method == b"CONNECT":
            self.state = _HEAD  # the bytes that follow belong to the new protocol


def _field(line: bytes) -> tuple[bytes, bytes]:
    """A header (or trailer) line's name and value, the value's surrounding whitespace off."""
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        raise ParseError(f"malformed header line {line[:80]!r}")
    if _BAD_VALUE.search(value):
        raise ParseError(f"invalid character in the value of {name[:80]!r}")
    return name, value.strip(b" \t")
