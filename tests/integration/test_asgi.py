"""A real FastAPI app through appmanager's ASGI support: routing, validation, lifespan state,
concurrency in one process, streaming, files, errors and WebSockets through the core."""

from __future__ import annotations

import base64
import json
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import APPS, connect, get, request
from test_frameworks import post


class WebSocketClient:
    """The smallest WebSocket client the tests need: text frames, masked, no extensions."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = connect(port)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError(f"closed during the handshake: {head!r}")
            head += chunk
        self.status = int(head.split(b" ", 2)[1])
        self.head = head

    def send_text(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        if len(payload) < 126:
            header = struct.pack("!BB", 0x81, 0x80 | len(payload))
        else:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, len(payload))
        self.sock.sendall(header + mask + masked)

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed inside a frame")
            data += chunk
        return data

    def receive(self) -> tuple[int, bytes]:
        first, second = self._exact(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._exact(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._exact(8))
        return first & 0x0F, self._exact(length)

    def close(self) -> None:
        mask = os.urandom(4)
        code = struct.pack("!H", 1000)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(code))
        self.sock.sendall(struct.pack("!BB", 0x88, 0x80 | 2) + mask + masked)
        opcode, _ = self.receive()
        assert opcode == 0x8
        self.sock.close()


def test_fastapi(server_factory) -> None:
    server = server_factory(APPS / "fastapi_app")
    assert "app type:     asgi (app.py)" in server.banner
    assert json.loads(get(server.port, "/items/5?q=x").body) == {"item_id": 5, "q": "x"}
    bad = get(server.port, "/items/notanumber")
    assert bad.status == 422
    resp = post(
        server.port, "/items", b'{"name": "pen", "price": 1.5, "tags": ["a"]}', "application/json"
    )
    assert json.loads(resp.body) == {"name": "pen", "double": 3.0, "tags": ["a"]}
    resp = post(server.port, "/items", b'{"name": "pen"}', "application/json", chunked=True)
    assert resp.status == 422
    state = json.loads(get(server.port, "/state").body)
    assert state["greeting"] == "hello from the lifespan"
    assert state["root_path"] == ""
    assert json.loads(get(server.port, "/sync").body) == {"main_thread": False}
    stream = get(server.port, "/stream")
    assert stream.body == b"".join(f"chunk {i}\n".encode() for i in range(5))
    assert get(server.port, "/file").body == (APPS / "fastapi_app" / "app.py").read_bytes()
    fail = get(server.port, "/fail")
    assert fail.status == 500
    server.wait_for_log("fastapi endpoint failed on purpose")


def test_fastapi_under_a_base_uri(server_factory) -> None:
    server = server_factory(APPS / "fastapi_app", "--base-uri", "/api")
    state = json.loads(get(server.port, "/api/state").body)
    assert state["root_path"] == "/api"
    assert state["url_for"].endswith("/api/state")


def test_websocket_through_the_core(server_factory) -> None:
    server = server_factory(APPS / "fastapi_app")
    ws = WebSocketClient(server.port, "/ws")
    assert ws.status == 101
    for text in ("hello", "x" * 1000):
        ws.send_text(text)
        opcode, payload = ws.receive()
        assert opcode == 0x1
        assert json.loads(payload) == {"echo": text, "greeting": "hello from the lifespan"}
    ws.close()
    # The process is still fine afterwards, and plain requests keep working.
    assert get(server.port, "/items/1").status == 200


def test_one_asgi_process_serves_requests_concurrently(server_factory) -> None:
    server = server_factory(APPS / "echo_asgi", "--max-pool-size", "1")
    start = time.monotonic()
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda _: get(server.port, "/app/sleep?1"), range(5)))
    assert all(r.status == 200 for r in results)
    assert len({r.body for r in results}) == 1  # one process
    assert time.monotonic() - start < 2.5, "an ASGI process must not serve one request at a time"


def test_asgi_crash_is_502_and_replaced(server_factory) -> None:
    server = server_factory(APPS / "echo_asgi")
    pid = get(server.port, "/app/pid").body
    assert get(server.port, "/app/crash").status == 502
    assert get(server.port, "/app/pid").body != pid


def test_lifespan_shutdown_runs_on_stop(server_factory, tmp_path: Path) -> None:
    app = tmp_path / "lifespan"
    app.mkdir()
    marker = tmp_path / "events"
    (app / "asgi.py").write_text(
        "import os\n"
        f"MARK = {str(marker)!r}\n"
        "async def app(scope, receive, send):\n"
        "    if scope['type'] == 'lifespan':\n"
        "        while True:\n"
        "            event = await receive()\n"
        "            with open(MARK, 'a') as f:\n"
        "                f.write(event['type'] + '\\n')\n"
        "            if event['type'] == 'lifespan.startup':\n"
        "                await send({'type': 'lifespan.startup.complete'})\n"
        "            else:\n"
        "                await send({'type': 'lifespan.shutdown.complete'})\n"
        "                return\n"
        "    await receive()\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': b'ok'})\n"
    )
    server = server_factory(app)
    assert get(server.port).body == b"ok"
    assert server.stop() == 0
    assert marker.read_text().split() == ["lifespan.startup", "lifespan.shutdown"]


def test_websocket_on_a_wsgi_app_is_an_ordinary_request(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    raw = (
        b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    resp = request(server.port, raw)
    assert resp.status == 200
    assert json.loads(resp.body)["PATH_INFO"] == "/ws"
