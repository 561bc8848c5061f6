"""The handoff protocol as both of the Python shim's servers speak it (docs/protocol/handoff.md).

What the WSGI server (``appmanager_python_wsgi``) and the ASGI server (``appmanager_python_asgi``)
share: reading a ``Q`` message and its descriptors, the request line, the progress file, the Date
header and the 500 page. No asyncio here: a WSGI process never imports it.
"""

from __future__ import annotations

import html
import socket
import struct
import sys
import time

# The core sends inline bodies of up to 256 KiB plus the head; 1 MiB leaves room for big heads.
MAX_MESSAGE = 1 << 20
# Room for the most descriptors a message carries: three, in a FORK (channel, progress, output).
ANCILLARY_SIZE = socket.CMSG_SPACE(3 * struct.calcsize("i"))
# recvmsg marks received descriptors close-on-exec, so subprocesses of the app never hold clients.
RECV_FLAGS = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
# Plain ints: the socket module's flags are IntFlag enums, slow to combine on every request.
TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)

# How long a write may wait for a client that does not read before the shim gives up on it.
WRITE_TIMEOUT = 60.0

# handoff.md: the seq of the response being begun, at offset 0 of the progress file.
pack_seq = struct.Struct("<Q").pack
_unpack_one_fd = struct.Struct("i").unpack
_unpack_two_fds = struct.Struct("2i").unpack

_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class ProtocolError(Exception):
    """The core sent something this shim cannot read; a bug on one side or a version mismatch."""


class ClientDisconnected(ConnectionError):
    """A write to the client failed: it went away, reset the connection or stopped reading."""


class StartupFailed(Exception):
    """The app's own start-up failed (an ASGI app's ``lifespan.startup.failed``); the message is
    the app's, and the step that failed is LOAD_APP."""


# One ``Q`` message, read (handoff.md): seq, flags, remote_addr, remote_port, server_addr,
# server_port, scheme (the fields of its line, the addresses and ports as sent), head, the inline
# body (b"" when it is in the body file), body_len, and whether the body is in the file. A plain
# tuple, not a NamedTuple or a class: it is built and taken apart on every request.
Request = tuple[int, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, int, bool]


def read_request(
    buffer: bytearray, view: memoryview, nbytes: int, msg_flags: int, nfds: int
) -> Request:
    """Reads the ``Q`` message in the first ``nbytes`` of ``buffer`` (``view`` is a memoryview of
    it), received with ``nfds`` descriptors. Copies the head and the inline body out, so that the
    buffer can take the next message. Raises ProtocolError."""
    if msg_flags & TRUNCATED:
        raise ProtocolError("message or its descriptors truncated")
    line_end = buffer.find(b"\n", 0, nbytes)
    if line_end < 0:
        raise ProtocolError(f"no line in control message {bytes(view[:80])!r}")
    fields = bytes(view[:line_end]).split(b" ")
    if len(fields) != 10 or fields[0] != b"Q":
        raise ProtocolError(f"expected 10 fields in a Q line, got {b' '.join(fields)!r}")
    _, seq, flags, raddr, rport, saddr, sport, scheme, head_len_s, body_len_s = fields
    try:
        head_len = int(head_len_s)
        body_len = int(body_len_s)
        number = int(seq)
    except ValueError:
        raise ProtocolError(f"unreadable numbers in {b' '.join(fields)!r}") from None
    body_in_file = b"F" in flags
    start = line_end + 1
    body_start = start + head_len
    if body_start + (0 if body_in_file else body_len) != nbytes or nfds != (
        2 if body_in_file else 1
    ):
        raise ProtocolError(f"{nbytes} bytes and {nfds} fds do not match the Q line")
    return (
        number,
        flags,
        raddr,
        rport,
        saddr,
        sport,
        scheme,
        bytes(view[start:body_start]),
        b"" if body_in_file else bytes(view[body_start:nbytes]),
        body_len,
        body_in_file,
    )


def request_seq(view: memoryview, nbytes: int) -> int | None:
    """The seq of a control message that ``read_request`` refused, to answer its ``D``; None when
    it has none."""
    line = bytes(view[: min(nbytes, 200)]).partition(b"\n")[0].split(b" ")
    try:
        return int(line[1])
    except (IndexError, ValueError):
        return None


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors in a message's SCM_RIGHTS ancillary data, in order."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
            continue
        if len(data) == 4:
            fds += _unpack_one_fd(data)
        elif len(data) == 8:
            fds += _unpack_two_fds(data)
        else:
            usable = len(data) - len(data) % 4
            fds += struct.unpack(f"{usable // 4}i", data[:usable])
    return fds


def absolute_form_path(path: bytes) -> bytes:
    """The path of an absolute-form request target ("http://host/path"), or the target itself
    when it is not one ("*" for OPTIONS)."""
    if b"://" not in path:
        return path
    return b"/" + path.split(b"://", 1)[1].partition(b"/")[2]


def connection_tokens(value: str) -> tuple[bool, bool]:
    """Whether a Connection header says ``close``, and whether it says ``keep-alive``."""
    tokens = [token.strip() for token in value.lower().split(",")]
    return "close" in tokens, "keep-alive" in tokens


class DateHeader:
    """The ``Date`` response header line, formatted at most once per second."""

    __slots__ = ("_second", "_line", "_raw")

    def __init__(self) -> None:
        self._second = -1
        self._line = ""
        self._raw = b""

    def line(self) -> str:
        """The header line, CRLF included."""
        now = int(time.time())
        if now != self._second:
            # Formatted by hand: strftime's day and month names follow the locale.
            t = time.gmtime(now)
            self._line = (
                f"Date: {_WEEKDAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} "
                f"{t.tm_year} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT\r\n"
            )
            self._raw = self._line.encode("latin-1")
            self._second = now
        return self._line

    def raw(self) -> bytes:
        """The header line as bytes."""
        if int(time.time()) != self._second:
            self.line()
        return self._raw


def error_page(text: str, development: bool) -> bytes:
    """The 500 page; the traceback only in development, where it helps more than it leaks."""
    detail = (
        f"<pre>{html.escape(text)}</pre>"
        if development
        else "<p>The application failed to answer this request.</p>"
    )
    return (
        "<!DOCTYPE html><html><head><title>500 Internal Server Error</title></head>"
        f"<body><h1>Internal Server Error</h1>{detail}</body></html>\n"
    ).encode()


def log(message: str) -> None:
    """One message to stderr, which the core logs line by line with the app and pid."""
    sys.stderr.write(f"appmanager_python: {message.rstrip()}\n")
