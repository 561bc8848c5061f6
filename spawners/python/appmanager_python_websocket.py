"""WebSocket connections (RFC 6455) for the Python shim's ASGI server.

When the core hands over a request with the ``U`` flag and an ``Upgrade: websocket`` header, the
connection is the process's until its ``D``, which always closes it (handoff.md). The server
checks the handshake, lets the app accept or refuse it (ASGI's websocket scope), then reads the
client's frames itself, with non-blocking reads driven by the event loop.

What is offered: text and binary messages of up to MAX_MESSAGE_SIZE bytes, fragmented or not;
pings answered with pongs; the close handshake both ways. No extensions (permessage-deflate is
not offered, so clients do not compress) and no pings from the server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import hashlib
import os
import struct
import traceback
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Run as a script, the shim imports its modules from its own directory; mypy, run from the
    # repository root, knows them by their package path.
    from spawners.python import appmanager_python_handoff as handoff
    from spawners.python.appmanager_python_asgi import ClientWriter, Worker
else:
    import appmanager_python_handoff as handoff

Message = dict[str, Any]

# RFC 6455 section 1.3: the key the client sends, plus this, hashed, proves the server read it.
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# The largest message the server puts together; a bigger one closes the connection with 1009.
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
# How long the server waits for the client's close frame after sending its own.
CLOSE_TIMEOUT = 5.0
READ_SIZE = 256 * 1024
# Messages the app has not received yet; past this, the server stops reading until it catches up.
MAX_QUEUED = 64

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# Close codes (RFC 6455 section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_SERVICE_RESTART = 1012

ClientDisconnected = handoff.ClientDisconnected
log = handoff.log
_pack_seq = handoff.pack_seq
_pack_medium = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack


class WebSocketError(Exception):
    """The client broke the protocol; ``code`` is the close code that says how."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def accept_key(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    """The values of a request header, joined with commas; b"" when absent."""
    return b",".join(value for key, value in headers if key == name)


def subprotocols(headers: list[tuple[bytes, bytes]]) -> list[str]:
    """The subprotocols the client offers, in its order of preference."""
    offered = header(headers, b"sec-websocket-protocol").decode("latin-1")
    return [token.strip() for token in offered.split(",") if token.strip()]


def handshake_problem(
    method: bytes, http_version: str, headers: list[tuple[bytes, bytes]]
) -> bytes:
    """The HTTP response that refuses a malformed opening handshake; b"" when it is sound."""
    connection = header(headers, b"connection").decode("latin-1").lower()
    key = header(headers, b"sec-websocket-key")
    try:
        key_ok = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        key_ok = False
    if (
        method != b"GET"
        or http_version != "1.1"
        or "upgrade" not in (token.strip() for token in connection.split(","))
        or not key_ok
    ):
        return plain_response(b"400 Bad Request")
    if header(headers, b"sec-websocket-version").strip() != b"13":
        return plain_response(b"426 Upgrade Required", b"sec-websocket-version: 13\r\n")
    return b""


def plain_response(status: bytes, extra: bytes = b"") -> bytes:
    """An HTTP response without a body that ends the connection."""
    return b"HTTP/1.1 %s\r\ncontent-length: 0\r\nconnection: close\r\n%s\r\n" % (status, extra)


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One unfragmented frame from the server (unmasked, section 5.1)."""
    length = len(payload)
    if length < 126:
        return bytes((0x80 | opcode, length)) + payload
    if length < 65536:
        return _pack_medium(0x80 | opcode, 126, length) + payload
    return _pack_long(0x80 | opcode, 127, length) + payload


def close_payload(code: int, reason: str) -> bytes:
    """A close frame's payload: the code, then the reason cut to fit a control frame."""
    return code.to_bytes(2, "big") + reason.encode()[:123]


def unmask(payload: bytes, mask: bytes) -> bytes:
    """The payload XORed with the repeated 4-byte mask, as one big-integer operation."""
    length = len(payload)
    if not length:
        return payload
    key = (mask * (length // 4 + 1))[:length]
    masked = int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
    return masked.to_bytes(length, "little")


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a close frame from the client; raises WebSocketError."""
    if not payload:
        return CLOSE_NO_STATUS, ""
    if len(payload) < 2:
        raise WebSocketError(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    # Codes a peer may send: the defined ones (1004-1006 and 1015 are for local use only) and
    # those of libraries and applications.
    if not (1000 <= code <= 1014 and code not in (1004, 1005, 1006)) and not 3000 <= code <= 4999:
        raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"close code {code} is not allowed")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketError(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
    return code, reason


class FrameReader:
    """Turns the client's bytes into messages and control frames (RFC 6455 section 5).

    Unmasks, joins fragments and enforces what a server must: every client frame masked, no
    reserved bits (no extension was agreed), control frames short and whole, continuations only
    inside a fragmented message, messages no larger than ``max_size``. Invariant: ``buffer``
    holds the start of a frame not yet complete; ``fragments`` the pieces of a message whose
    last frame has not come, of type ``fragment_opcode`` (0 when there is none).
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.buffer = bytearray()
        self.fragments: list[bytes] = []
        self.fragment_opcode = 0
        self.fragment_size = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The messages (text and binary, whole) and control frames that ``data`` completes, as
        (opcode, payload) pairs; raises WebSocketError."""
        buffer = self.buffer
        buffer += data
        events: list[tuple[int, bytes]] = []
        size = len(buffer)
        pos = 0
        while size - pos >= 2:
            first, second = buffer[pos], buffer[pos + 1]
            if first & 0x70:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "reserved bits set")
            if not second & 0x80:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "client frame not masked")
            final = first & 0x80
            opcode = first & 0x0F
            length = second & 0x7F
            start = pos + 2
            if length == 126:
                if size - start < 2:
                    break
                length = int.from_bytes(buffer[start : start + 2], "big")
                start += 2
            elif length == 127:
                if size - start < 8:
                    break
                length = int.from_bytes(buffer[start : start + 8], "big")
                start += 8
            if opcode >= OP_CLOSE:
                if opcode > OP_PONG:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
                if not final or length > 125:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "fragmented or long control frame")
            elif opcode > OP_BINARY:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
            elif self.fragment_size + length > self.max_size:
                # Refused from the header alone: the bytes need not arrive first.
                raise WebSocketError(CLOSE_TOO_BIG, f"message over {self.max_size} bytes")
            end = start + 4 + length
            if size < end:
                break
            payload = unmask(bytes(buffer[start + 4 : end]), bytes(buffer[start : start + 4]))
            pos = end
            if opcode >= OP_CLOSE:
                events.append((opcode, payload))
            elif opcode == OP_CONTINUATION:
                if not self.fragment_opcode:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "continuation outside a message")
                self.fragments.append(payload)
                self.fragment_size += length
                if final:
                    events.append((self.fragment_opcode, b"".join(self.fragments)))
                    self.fragments = []
                    self.fragment_opcode = 0
                    self.fragment_size = 0
            elif self.fragment_opcode:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
            elif final:
                events.append((opcode, payload))
            else:
                self.fragment_opcode = opcode
                self.fragments = [payload]
                self.fragment_size = length
        del buffer[:pos]
        return events


class State(enum.Enum):
    """Where a WebSocket connection is in its life."""

    CONNECTING = "connecting"  # the handshake is the app's to accept or refuse
    OPEN = "open"  # accepted: messages flow both ways
    CLOSING = "closing"  # the server sent its close frame and waits for the client's
    CLOSED = "closed"  # both close frames went, or the connection is lost or was refused


class WebSocketCycle:
    """One WebSocket connection: its handshake, then frames both ways, for one call of the app.

    Lives from its ``Q`` message to its ``D``, always ``c`` (with, for the access log, the status
    of the handshake's answer and the frame bytes sent after it), and owns the descriptors that
    came with the message. The transitions, each in ``transition``: CONNECTING -> OPEN when the app
    accepts; CONNECTING -> CLOSED when it refuses (403) or fails (500); OPEN -> CLOSING when the
    server sends a close frame; OPEN or CLOSING -> CLOSED when the client's close frame arrives,
    the connection is lost, the client breaks the protocol, or CLOSE_TIMEOUT passes. Invariants:
    the client is read only in OPEN and CLOSING, and only while fewer than MAX_QUEUED messages
    wait for the app; ``disconnect`` is set once the connection is CLOSED after being OPEN.
    """

    def __init__(
        self,
        worker: Worker,
        seq: int,
        fds: list[int],
        scope: dict[str, Any],
        method: bytes,
        writer: ClientWriter,
        initial: bytes = b"",
    ) -> None:
        self.worker = worker
        self.loop = worker.loop
        self.seq = seq
        self.fds = fds
        self.fd = fds[0]
        self.scope = scope
        self.writer = writer
        self.problem = handshake_problem(method, scope["http_version"], scope["headers"])
        self.state = State.CONNECTING
        self.connect_delivered = False
        self.messages: deque[Message] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.disconnect: Message | None = None
        self.frames = FrameReader(MAX_MESSAGE_SIZE)
        # The client's first bytes after the handshake when they were read with it (a
        # connection the process reads itself); fed to ``frames`` once the connection is open.
        self.initial = initial
        self.reading = False
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.close_timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        # For the access log (D): the status of the handshake's answer once it went out (101,
        # or the error that refused it), and the frame bytes written after it.
        self.status = 0
        self.sent = 0

    def transition(self, state: State) -> None:
        """The one place the state changes; what each state needs of the loop follows it."""
        self.state = state
        if state is State.OPEN:
            self.start_reading()
        elif state is State.CLOSING:
            self.close_timer = self.loop.call_later(CLOSE_TIMEOUT, self.close_timed_out)
        elif state is State.CLOSED:
            self.stop_reading()
            if self.close_timer is not None:
                self.close_timer.cancel()
                self.close_timer = None
            if not self.closed.done():
                self.closed.set_result(None)

    async def run(self) -> None:
        """Runs the app on the connection, then reports ``D c``."""
        try:
            if self.problem:
                self.send_first(self.problem, int(self.problem[9:12]))
            else:
                await self.run_app()
            if self.state is State.CLOSING:
                await self.closed
            if self.writer.pending:
                await self.writer.drain()
        except ClientDisconnected:
            pass
        finally:
            self.close()

    async def run_app(self) -> None:
        try:
            await self.worker.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            return
        except Exception as exc:
            text = "".join(traceback.format_exception(exc))
            log(f"error in WebSocket {self.seq} ({self.scope['path']}):\n{text}")
            if self.state is State.CONNECTING:
                self.refuse(b"500 Internal Server Error")  # CONNECTING -> CLOSED
            elif self.state is State.OPEN:
                self.send_close(CLOSE_INTERNAL_ERROR, "")  # OPEN -> CLOSING
            return
        if self.state is State.CONNECTING:
            log(f"WebSocket {self.seq}: the app returned without accepting or closing it")
            self.refuse(b"500 Internal Server Error")  # CONNECTING -> CLOSED
        elif self.state is State.OPEN:
            self.send_close(CLOSE_NORMAL, "")  # OPEN -> CLOSING

    def close(self) -> None:
        """Lets go of the connection: reader, waiting receive() calls, then what ``release``
        does."""
        if self.state is not State.CLOSED:
            self.transition(State.CLOSED)
        self.wake()
        self.worker.cycles.discard(self)
        self.release()

    def release(self) -> None:
        """The end of a connection handed over with ``Q`` and flag ``U``: its writer and
        descriptors closed, then ``D c``."""
        self.writer.close()
        for fd in self.fds:
            os.close(fd)
        # The numbers of closed descriptors may soon belong to another request's.
        self.writer.fd = self.fd = -1
        self.fds = []
        if self.status:
            self.worker.reply(b"D %d c %d %d" % (self.seq, self.status, self.sent))
        else:
            self.worker.reply(b"D %d c" % self.seq)

    def going_away(self) -> None:
        """The server is stopping: an open connection is closed with 1012 (service restart)."""
        if self.state is State.OPEN:
            try:
                self.send_close(CLOSE_SERVICE_RESTART, "server restarting")  # OPEN -> CLOSING
            except ClientDisconnected:
                self.lost()

    async def receive(self) -> Message:
        """``websocket.connect`` first, then the client's messages, then
        ``websocket.disconnect``."""
        if not self.connect_delivered:
            self.connect_delivered = True
            return {"type": "websocket.connect"}
        while not self.messages:
            if self.disconnect is not None:
                return dict(self.disconnect)
            if self.state is State.CLOSED:
                # Refused, or failed, before it was ever open.
                return {"type": "websocket.disconnect", "code": CLOSE_ABNORMAL, "reason": ""}
            self.waiter = self.loop.create_future()
            await self.waiter
        message = self.messages.popleft()
        if (
            not self.reading
            and len(self.messages) <= MAX_QUEUED // 2
            and (self.state is State.OPEN or self.state is State.CLOSING)
        ):
            self.start_reading()
        return message

    async def send(self, message: Message) -> None:
        """Takes ``websocket.accept``, ``websocket.send`` and ``websocket.close``."""
        kind = message["type"]
        if kind == "websocket.send":
            if self.state is not State.OPEN:
                if self.state is State.CONNECTING:
                    raise RuntimeError("websocket.send before websocket.accept")
                raise ClientDisconnected("the WebSocket connection is closed")
            data = message.get("bytes")
            if data is not None:
                self.write_frame(OP_BINARY, data)
            else:
                text = message.get("text")
                if text is None:
                    raise ValueError("websocket.send with neither bytes nor text")
                self.write_frame(OP_TEXT, text.encode())
            if self.writer.pending:
                await self.writer.drain()
        elif kind == "websocket.accept":
            if self.state is not State.CONNECTING:
                raise RuntimeError(f"websocket.accept on a connection that is {self.state.value}")
            self.accept(message.get("subprotocol"), message.get("headers") or ())
        elif kind == "websocket.close":
            if self.state is State.CONNECTING:
                self.refuse(b"403 Forbidden")  # CONNECTING -> CLOSED
            elif self.state is State.OPEN:
                code = message.get("code") or CLOSE_NORMAL
                self.send_close(int(code), str(message.get("reason") or ""))  # OPEN -> CLOSING
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on a websocket scope")

    def send_first(self, data: bytes, status: int) -> None:
        """Writes the answer to the handshake, with its ``status``; the progress file says so
        first."""
        self.mark_started()
        self.writer.write(data)
        self.status = status

    def mark_started(self) -> None:
        """The progress file says the answer begins (handoff.md: the core reads it only if the
        process dies holding the request)."""
        os.pwrite(self.worker.progress_fd, _pack_seq(self.seq), 0)

    def write_frame(self, opcode: int, payload: bytes) -> None:
        """Writes one frame to the client (counted for the access log)."""
        frame = encode_frame(opcode, payload)
        self.writer.write(frame)
        self.sent += len(frame)

    def accept(self, subprotocol: str | None, headers: Any) -> None:
        """Completes the handshake (101 Switching Protocols)."""
        parts = [
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-accept: ",
            accept_key(header(self.scope["headers"], b"sec-websocket-key")),
            b"\r\n",
        ]
        lines = 4
        if subprotocol:
            parts += (b"sec-websocket-protocol: ", subprotocol.encode("latin-1"), b"\r\n")
            lines += 1
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
            lines += 1
        head = b"".join(parts)
        if head.count(b"\n") != lines or head.count(b"\r") != lines:
            raise ValueError("a websocket.accept header holds CR or LF")
        self.send_first(head + b"\r\n", 101)
        self.transition(State.OPEN)  # CONNECTING -> OPEN
        if self.worker.stopping:
            self.going_away()

    def refuse(self, status: bytes) -> None:
        """Answers the handshake with an HTTP error instead of accepting it."""
        self.transition(State.CLOSED)  # CONNECTING -> CLOSED
        self.send_first(plain_response(status), int(status[:3]))

    def send_close(self, code: int, reason: str) -> None:
        """Sends the server's close frame; the connection ends when the client answers."""
        self.transition(State.CLOSING)  # OPEN -> CLOSING
        self.write_frame(OP_CLOSE, close_payload(code, reason))

    def start_reading(self) -> None:
        if not self.reading:
            self.reading = True
            self.loop.add_reader(self.fd, self.on_readable)
            if self.initial:
                # Frames that came with the handshake, read before the connection was ours.
                data, self.initial = self.initial, b""
                self.loop.call_soon(self.on_data, data)

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)

    def on_readable(self) -> None:
        """Reads what the client sent and acts on every frame it completes."""
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.lost()
            return
        self.on_data(data)

    def on_data(self, data: bytes) -> None:
        """Acts on every frame the client's bytes complete."""
        if not self.reading:
            return  # frames that came with the handshake, once the connection is over
        try:
            events = self.frames.feed(data)
            for opcode, payload in events:
                self.on_frame(opcode, payload)
                if self.state is State.CLOSED:
                    return
        except WebSocketError as exc:
            self.protocol_error(exc)
            return
        except ClientDisconnected:
            self.lost()
            return
        if len(self.messages) >= MAX_QUEUED:
            self.stop_reading()

    def on_frame(self, opcode: int, payload: bytes) -> None:
        """One message or control frame from the client."""
        if opcode == OP_TEXT:
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                raise WebSocketError(CLOSE_INVALID_DATA, "text message is not UTF-8") from None
            if self.state is State.OPEN:
                self.deliver({"type": "websocket.receive", "text": text})
        elif opcode == OP_BINARY:
            if self.state is State.OPEN:
                self.deliver({"type": "websocket.receive", "bytes": payload})
        elif opcode == OP_PING:
            if self.state is State.OPEN:
                self.write_frame(OP_PONG, payload)
        elif opcode == OP_CLOSE:
            code, reason = parse_close(payload)
            if self.state is State.OPEN:
                # The client closes first: the server answers with the same code.
                answer = CLOSE_NORMAL if code == CLOSE_NO_STATUS else code
                try:
                    self.write_frame(OP_CLOSE, close_payload(answer, ""))
                except ClientDisconnected:
                    pass
            self.finish(code, reason)  # OPEN or CLOSING -> CLOSED

    def deliver(self, message: Message) -> None:
        self.messages.append(message)
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def finish(self, code: int, reason: str) -> None:
        """The connection is over; the app hears ``websocket.disconnect`` with ``code``."""
        if self.disconnect is None:
            self.disconnect = {"type": "websocket.disconnect", "code": code, "reason": reason}
        self.transition(State.CLOSED)
        self.wake()

    def protocol_error(self, exc: WebSocketError) -> None:
        """The client broke the protocol: the server closes with the code that says how."""
        if self.state is State.OPEN:
            try:
                self.write_frame(OP_CLOSE, close_payload(exc.code, exc.reason))
            except ClientDisconnected:
                pass
        self.finish(exc.code, exc.reason)  # OPEN or CLOSING -> CLOSED

    def lost(self) -> None:
        """The connection ended without a close frame."""
        self.finish(CLOSE_ABNORMAL, "")  # OPEN or CLOSING -> CLOSED

    def close_timed_out(self) -> None:
        self.close_timer = None
        if self.state is State.CLOSING:
            self.finish(CLOSE_ABNORMAL, "")  # CLOSING -> CLOSED
