"""Relaying one request to an app over a connection of the core's own, and its response back.

Used where the core cannot hand the client's descriptor to the app: generic ``$PORT`` apps
(``proxy.py``), and Node apps serving a connector's requests (``process_node.py``), since a web
server's connection to the core carries requests for every app. The request goes out with the
core's framing (``Content-Length``, keep-alive) and the client's address in ``X-Forwarded-For``
and ``X-Forwarded-Proto``; the response's bytes go back unchanged, while httptools finds where it
ends so that the client connection can stay open.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import TYPE_CHECKING

import httptools

if TYPE_CHECKING:
    from appmanager.front import Connection
    from appmanager.request import Request

# Request headers the core sets itself on the way to the app.
_DROP = frozenset(
    (b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"expect", b"te")
)
_FORWARDED = frozenset((b"x-forwarded-for", b"x-forwarded-proto"))


class ResponseState:
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


async def send_request(
    loop: asyncio.AbstractEventLoop, upstream: socket.socket, conn: Connection, request: Request
) -> None:
    """Write ``request`` (head and body) to ``upstream``."""
    lines = request.head.split(b"\r\n")
    out = [lines[0]]
    for line in lines[1:]:
        if not line:
            continue
        name = line.split(b":", 1)[0].strip().lower()
        if name not in _DROP and name not in _FORWARDED:
            out.append(line)
    remote, _port, _server, _server_port, scheme = conn.meta.split(b" ")
    out.append(b"X-Forwarded-For: " + remote)
    out.append(b"X-Forwarded-Proto: " + scheme)
    if request.body_len or request.method not in (b"GET", b"HEAD", b"DELETE", b"OPTIONS"):
        out.append(b"Content-Length: %d" % request.body_len)
    out.append(b"Connection: keep-alive")
    head = b"\r\n".join(out) + b"\r\n\r\n"
    if request.body_file is None:
        await loop.sock_sendall(upstream, head + request.body)
        return
    await loop.sock_sendall(upstream, head)
    fd = request.body_file.fileno()
    offset = 0
    while offset < request.body_len:
        chunk = os.pread(fd, 256 * 1024, offset)
        if not chunk:
            break
        await loop.sock_sendall(upstream, chunk)
        offset += len(chunk)


async def relay_response(
    loop: asyncio.AbstractEventLoop,
    upstream: socket.socket,
    conn: Connection,
    request: Request,
    state: ResponseState,
    parser: httptools.HttpResponseParser,
) -> tuple[bool, bool, bool]:
    """Copy the app's response to the client. Returns (anything relayed, the client
    connection may stay open, the upstream connection may be reused)."""
    head_only = request.method == b"HEAD"
    relayed = False
    head_buf = b""
    while True:
        data = await loop.sock_recv(upstream, 65536)
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
                await loop.sock_sendall(conn.sock, head_buf[: end + 4])
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
        await loop.sock_sendall(conn.sock, data)
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
