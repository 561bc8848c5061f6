"""Whole connections for the Python shim's ASGI server (docs/protocol/handoff.md, "Whole
connections"): what is ASGI's own, the body streamed to the app, the scope, a stop that closes idle
connections (the Ruby shim gives them back instead), and WebSocket. What every shim does on a
connection is tested in test_shim_connections.py, driven the same way: the test plays the core,
hands the shim loopback TCP connections with ``C`` and the bytes "already read", then talks HTTP on
the client's end while reading the shim's ``X``, ``N`` and ``L`` reports.

Every test runs twice: with httptools parsing the requests, and with the shim's pure-Python parser
(``APPMANAGER_PYTHON_HTTP_PARSER=python``), which must behave the same.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from python_shim import (
    PARSERS,
    Client,
    closed_report,
    get,
    hand,
    spawning_asgi_echo,
)


@pytest.fixture(params=PARSERS)
def spawn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """``spawn(**spawn_fields)``: a shim on the ASGI echo app with the parser under test."""
    parser: str = request.param
    yield from spawning_asgi_echo(tmp_path, parser)


# The body, the scope


def test_the_body_reaches_the_app_as_it_arrives(spawn: Any) -> None:
    shim = spawn()
    head = get("/echo", "Transfer-Encoding: chunked", method="POST")
    connection, client, _ = hand(shim, head + b"5\r\nhello\r\n")
    time.sleep(0.2)
    client.send(b"6\r\n world\r\n0\r\n\r\n")
    data = client.read().json()
    assert data["body"]["length"] == 11
    assert data["body"]["more_body"][-1] is False
    # Chunked framing stays the client's: the header reaches the app as it was sent.
    assert ["transfer-encoding", "chunked"] in data["headers"]


def test_a_body_that_breaks_off_malformed_is_answered_400(spawn: Any) -> None:
    """The app runs from the head on; a chunk that turns out malformed makes it hear
    http.disconnect, and the answer is the core's for such a body, 400, not the app's 500."""
    shim = spawn()
    head = get("/echo", "Transfer-Encoding: chunked", method="POST")
    connection, client, seq = hand(shim, head + b"5\r\nhello\r\n")
    time.sleep(0.2)
    client.send(b"zz\r\n")
    response = client.read()
    assert response.status == 400, response.body
    assert b"malformed request body" in response.body
    assert response.header("connection") == "close"
    assert client.at_eof()
    closed_report(shim, seq, [connection])


def test_scope_has_the_lifespan_state_and_the_addresses(spawn: Any) -> None:
    shim = spawn(base_uri="/base/")
    connection, client, _ = hand(shim, get("/base/echo?q=1"), scheme="https")
    client.send(get("/base/echo?q=2"))
    for query in ("q=1", "q=2"):
        scope = client.read().json()
        assert scope["state"] == {"started": True}
        assert scope["root_path"] == "/base"
        assert scope["path"] == "/base/echo"
        assert scope["query_string"] == query
        assert scope["scheme"] == "https"
        assert scope["server"] == ["127.0.0.1", 8000]
        assert scope["client"] == ["192.0.2.7", 54321]
        assert scope["http_version"] == "1.1"


# Stopping


# WebSocket


def test_websocket_on_a_connection(spawn: Any) -> None:
    shim = spawn(access_log=True)
    key = base64.b64encode(os.urandom(16)).decode()
    head = get(
        "/ws",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    )
    # A frame that came with the handshake, read by the core with it.
    connection, client, seq = hand(shim, head + masked_text("early"))
    response = client.read(head_request=True)
    assert response.status == 101
    expected = base64.b64encode(
        hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    ).decode()
    assert response.header("sec-websocket-accept") == expected
    assert read_frame(client) == (0x1, b"early")
    client.send(masked_text("later"))
    assert read_frame(client) == (0x1, b"later")
    client.send(masked_frame(0x8, struct.pack("!H", 1000)))
    assert read_frame(client)[0] == 0x8
    assert client.at_eof()
    line = shim.wait_report("L ", [connection])
    assert line.split("\n")[0].startswith(f"L {seq} 101 ")
    assert closed_report(shim, seq, [connection]) == 1


def masked_frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


def masked_text(text: str) -> bytes:
    return masked_frame(0x1, text.encode())


def read_frame(client: Client) -> tuple[int, bytes]:
    while len(client.buf) < 2 or len(client.buf) < 2 + (client.buf[1] & 0x7F):
        data = client.sock.recv(1 << 16)
        assert data, "closed inside a frame"
        client.buf += data
    length = client.buf[1] & 0x7F
    opcode, payload = client.buf[0] & 0x0F, client.buf[2 : 2 + length]
    client.buf = client.buf[2 + length :]
    return opcode, payload
