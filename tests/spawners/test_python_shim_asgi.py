"""The Python shim's ASGI server driven over its real protocols (docs/protocol/handoff.md).

The test plays the core (python_shim.py) and hands the shim real loopback TCP connections. ASGI
processes report concurrency 0, so requests are handed over while others are in flight and their
D messages come in any order. WebSocket connections are handed over with the U flag; the test's
client speaks RFC 6455 itself (handshake, masked frames).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from python_shim import (
    TIMEOUT,
    Connection,
    HTTPResponse,
    Shim,
    http_head,
    parse_response,
    spawner,
    start_shim,
)

APPS = Path(__file__).resolve().parents[1] / "apps"
ECHO_ASGI = APPS / "echo_asgi" / "app.py"
FASTAPI_APP = APPS / "fastapi_app" / "app.py"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

STARLETTE_APP = """
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Mount, Route, WebSocketRoute
    from starlette.staticfiles import StaticFiles


    @asynccontextmanager
    async def lifespan(app):
        yield {"opened": "by the lifespan"}


    async def home(request):
        return PlainTextResponse("home of " + request.url.path)


    async def info(request):
        return JSONResponse(
            {
                "url": str(request.url),
                "query": dict(request.query_params),
                "opened": request.state.opened,
                "client": list(request.client),
            }
        )


    async def echo_body(request):
        return PlainTextResponse(await request.body())


    async def chat(websocket):
        await websocket.accept(subprotocol="chat")
        async for text in websocket.iter_text():
            await websocket.send_text(text.upper())


    app = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", home),
            Route("/info", info),
            Route("/body", echo_body, methods=["POST"]),
            Mount("/static", StaticFiles(directory="static")),
            WebSocketRoute("/chat", chat),
        ],
    )
"""


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Starts shims on app files written under tmp_path; stops every one of them afterwards."""
    markers = tmp_path / "markers"
    markers.mkdir()
    yield from spawner(tmp_path, {"ECHO_ASGI_MARKERS": str(markers)})


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shim]:
    """One shim on the ASGI echo app, shared by the tests that only send requests."""
    root = tmp_path_factory.mktemp("echo_asgi")
    shutil.copy(ECHO_ASGI, root / "app.py")
    markers = root / "markers"
    markers.mkdir()
    shim = start_shim(root, {"ECHO_ASGI_MARKERS": str(markers)})
    try:
        tag, payload = shim.handshake(
            app_root=str(root), startup_file=str(root / "app.py"), app_type="python"
        )
        assert tag == "READY", payload
        yield shim
    finally:
        shim.stop()


def spawn_echo(spawn: Any, **config: Any) -> Shim:
    config.setdefault("app_type", "python")
    shim, tag, payload = spawn({"app.py": ECHO_ASGI.read_text()}, "app.py", **config)
    assert tag == "READY", payload
    return shim  # type: ignore[no-any-return]


def markers_of(shim: Shim) -> Path:
    return shim.log_path.parent.parent / "markers"


def wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {TIMEOUT} s"
        time.sleep(0.01)


class WebSocketClient:
    """The client's side of RFC 6455 on a test connection: the handshake, masked frames."""

    def __init__(self, connection: Connection) -> None:
        self.sock = connection.client
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("connection closed")
        self.buf += data

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_head(self) -> HTTPResponse:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        response, _ = parse_response(head + b"\r\n\r\n", head_request=True)
        return response

    def send_frame(
        self, opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True
    ) -> None:
        first = (0x80 if fin else 0) | opcode
        length = len(payload)
        mask_bit = 0x80 if masked else 0
        if length < 126:
            head = bytes((first, mask_bit | length))
        elif length < 65536:
            head = struct.pack("!BBH", first, mask_bit | 126, length)
        else:
            head = struct.pack("!BBQ", first, mask_bit | 127, length)
        if masked:
            mask = os.urandom(4)
            key = (mask * (length // 4 + 1))[:length]
            payload = bytes(a ^ b for a, b in zip(payload, key, strict=True)) if length else b""
            head += mask
        self.sock.sendall(head + payload)

    def send_text(self, text: str) -> None:
        self.send_frame(0x1, text.encode())

    def send_close(self, code: int = 1000) -> None:
        self.send_frame(0x8, code.to_bytes(2, "big"))

    def recv_frame(self) -> tuple[bool, int, bytes]:
        first, second = self.read_exact(2)
        assert not second & 0x80, "server frames are never masked"
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(self.read_exact(2), "big")
        elif length == 127:
            length = int.from_bytes(self.read_exact(8), "big")
        return bool(first & 0x80), first & 0x0F, self.read_exact(length)

    def recv_close(self) -> tuple[int, str]:
        fin, opcode, payload = self.recv_frame()
        assert (fin, opcode) == (True, 0x8), (opcode, payload)
        return int.from_bytes(payload[:2], "big"), payload[2:].decode()

    def at_eof(self) -> bool:
        return self.sock.recv(1) == b""


def ws_head(
    path: str = "/ws",
    *headers: tuple[str, str],
    version: str = "13",
    key: str = "x3JJHMbDL1EzLkh9GBhXDw==",
) -> bytes:
    """A WebSocket opening handshake (RFC 6455 section 4.1)."""
    return http_head(
        path,
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", version),
        *headers,
    )


def open_websocket(
    shim: Shim, path: str = "/ws", *headers: tuple[str, str], scheme: str = "http"
) -> tuple[Connection, WebSocketClient, HTTPResponse, int]:
    """Hands a WebSocket handshake to the shim with the U flag; returns the connection, a client
    on it, the handshake's response and the request's seq."""
    connection = shim.connect()
    key = base64.b64encode(os.urandom(16)).decode()
    seq = shim.submit(connection, ws_head(path, *headers, key=key), flags="U", scheme=scheme)
    client = WebSocketClient(connection)
    response = client.read_head()
    if response.status == 101:
        expected = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        assert response.header("sec-websocket-accept") == expected
    return connection, client, response, seq


# The handshake and the choice between WSGI and ASGI


def test_ready_says_asgi_unlimited_concurrency_and_whole_connections(spawn: Any) -> None:
    shim, tag, payload = spawn({"app.py": ECHO_ASGI.read_text()}, "app.py", app_type="python")
    assert tag == "READY"
    assert payload == {
        "pid": shim.process.pid,
        "concurrency": 0,
        "protocol": 1,
        "app_type": "asgi",
        "connections": True,
    }


def test_a_wsgi_app_under_app_type_python_is_served_as_wsgi(spawn: Any) -> None:
    app = """
        def application(environ, start_response):
            start_response("200 OK", [])
            return [b"wsgi"]
    """
    shim, tag, payload = spawn({"app.py": app}, "app.py", app_type="python")
    assert (tag, payload["app_type"], payload["concurrency"]) == ("READY", "wsgi", 1)
    assert shim.request(http_head()).response.body == b"wsgi"


def test_an_object_with_an_async_call_is_asgi(spawn: Any) -> None:
    app = """
        class App:
            async def __call__(self, scope, receive, send):
                if scope["type"] != "http":
                    return
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"object"})

        app = App()
    """
    shim, tag, payload = spawn({"app.py": app}, "app.py", app_type="python")
    assert (tag, payload["app_type"]) == ("READY", "asgi")
    assert shim.request(http_head()).response.body == b"object"


def test_app_type_asgi_forces_asgi_on_a_plain_function(spawn: Any) -> None:
    # A plain function returning the coroutine looks like WSGI; the app type says otherwise.
    app = """
        async def inner(scope, receive, send):
            if scope["type"] != "http":
                return
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"forced"})

        def app(scope, receive, send):
            return inner(scope, receive, send)
    """
    shim, tag, payload = spawn({"app.py": app}, "app.py", app_type="asgi")
    assert (tag, payload["app_type"], payload["concurrency"]) == ("READY", "asgi", 0)
    assert shim.request(http_head()).response.body == b"forced"


def test_an_unknown_app_type_fails_prepare(spawn: Any) -> None:
    shim, tag, payload = spawn({"app.py": ECHO_ASGI.read_text()}, "app.py", app_type="rack")
    assert (tag, payload["step"]) == ("ERROR", "PREPARE")
    assert "rack" in payload["message"]
    assert shim.process.wait(TIMEOUT) == 1


# The scope


def test_http_scope(echo: Shim) -> None:
    head = http_head(
        "/some/path?a=1&b=%20",
        ("Content-Type", "text/plain"),
        ("X-Multi", "a"),
        ("x-multi", "b"),
        ("Transfer-Encoding", "chunked"),
        method="POST",
    )
    result = echo.request(head, b"hello", scheme="https")
    scope = result.response.json()
    assert result.done == f"D {echo.seq} k"
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "POST"
    assert scope["scheme"] == "https"
    assert scope["path"] == "/some/path"
    assert scope["raw_path"] == "/some/path"
    assert scope["query_string"] == "a=1&b=%20"
    assert scope["root_path"] == ""
    assert scope["client"] == ["192.0.2.7", 54321]
    assert scope["server"] == ["127.0.0.1", 8000]
    assert scope["headers"] == [
        ["host", "example.test:8080"],
        ["content-type", "text/plain"],
        ["x-multi", "a"],
        ["x-multi", "b"],
        # The core de-chunked the body: its length replaces Transfer-Encoding.
        ["content-length", "5"],
    ]
    assert scope["state"] == {"started": True}
    assert scope["extensions"] == ["http.response.pathsend"]
    assert scope["body"]["length"] == 5


def test_path_is_percent_decoded_utf_8_and_raw_path_is_not(echo: Shim) -> None:
    scope = echo.request(http_head("/caf%C3%A9/a%2Fb?q=caf%C3%A9")).response.json()
    assert scope["path"] == "/caf\u00e9/a/b"
    assert scope["raw_path"] == "/caf%C3%A9/a%2Fb"
    assert scope["query_string"] == "q=caf%C3%A9"


def test_absolute_form_target(echo: Shim) -> None:
    scope = echo.request(http_head("http://example.test/abs/path?x=1")).response.json()
    assert (scope["path"], scope["query_string"]) == ("/abs/path", "x=1")


def test_http_1_0_scope(echo: Shim) -> None:
    result = echo.request(http_head(version="HTTP/1.0"))
    assert result.response.json()["http_version"] == "1.0"
    assert result.done == f"D {echo.seq} c"


def test_base_uri_is_the_root_path_and_stays_in_the_path(spawn: Any) -> None:
    shim = spawn_echo(spawn, base_uri="/sub/")
    scope = shim.request(http_head("/sub/page?x=1")).response.json()
    assert (scope["root_path"], scope["path"]) == ("/sub", "/sub/page")


# The request body


def test_inline_body_is_one_message(echo: Shim) -> None:
    body = os.urandom(200 * 1024)
    scope = echo.request(http_head("/", method="POST"), body).response.json()
    assert scope["body"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert scope["body"]["more_body"] == [False]


def test_no_body_is_one_empty_message(echo: Shim) -> None:
    scope = echo.request(http_head()).response.json()
    assert scope["body"] == {
        "length": 0,
        "sha256": hashlib.sha256(b"").hexdigest(),
        "pieces": 1,
        "more_body": [False],
    }
    assert "content-length" not in dict(scope["headers"])


def test_body_in_a_file_comes_in_pieces_and_never_past_body_len(echo: Shim, tmp_path: Path) -> None:
    body = os.urandom(5 * 1024 * 1024 + 3)
    path = tmp_path / "body"
    path.write_bytes(body + b"NOT PART OF THE BODY")
    result = echo.request(http_head("/", method="POST"), body, body_file=path)
    scope = result.response.json()
    assert result.done == f"D {echo.seq} k"
    assert scope["body"]["length"] == len(body)
    assert scope["body"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert scope["body"]["pieces"] > 1
    assert scope["body"]["more_body"] == [True] * (scope["body"]["pieces"] - 1) + [False]
    assert dict(scope["headers"])["content-length"] == str(len(body))


# Responses


def test_whole_body_gets_content_length_and_keep_alive(echo: Shim) -> None:
    result = echo.request(http_head("/app/pid"))
    response = result.response
    assert result.done == f"D {echo.seq} k"
    assert response.status == 200
    assert response.header("Content-Length") == str(len(response.body))
    assert response.header("Connection") is None
    assert (response.header("Date") or "").endswith(" GMT")
    assert response.body == str(echo.process.pid).encode()


def test_progress_file_holds_the_seq_of_the_last_response(echo: Shim) -> None:
    echo.request(http_head("/app/stream"))
    assert echo.progress() == echo.seq


def test_streamed_body_is_chunked_on_http_1_1(echo: Shim) -> None:
    result = echo.request(http_head("/app/stream"))
    assert result.done == f"D {echo.seq} k"
    assert result.response.chunked
    assert result.response.body == b"line 0\nline 1\nline 2\n"
    assert result.raw.endswith(b"7\r\nline 2\n\r\n0\r\n\r\n")


def test_streamed_body_is_close_delimited_on_http_1_0(echo: Shim) -> None:
    result = echo.request(http_head("/app/stream", version="HTTP/1.0"))
    assert result.done == f"D {echo.seq} c"
    assert not result.response.chunked
    assert result.response.header("Connection") == "close"
    assert result.response.body == b"line 0\nline 1\nline 2\n"


def test_http_1_0_keep_alive_with_a_known_length(echo: Shim) -> None:
    head = http_head("/app/pid", ("Connection", "keep-alive"), version="HTTP/1.0")
    result = echo.request(head)
    assert result.done == f"D {echo.seq} k"
    assert result.response.header("Connection") == "keep-alive"


def test_streamed_body_with_the_apps_content_length_is_not_chunked(echo: Shim) -> None:
    result = echo.request(http_head("/app/stream-length"))
    assert result.done == f"D {echo.seq} k"
    assert not result.response.chunked
    assert result.response.body == b"0123456789"


def test_big_streamed_body(echo: Shim) -> None:
    result = echo.request(http_head("/app/big"))
    assert result.done == f"D {echo.seq} k"
    assert result.response.body == b"z" * 65536 * 160


def test_head_sends_the_headers_only(echo: Shim) -> None:
    result = echo.request(http_head("/app/pid", method="HEAD"))
    assert result.done == f"D {echo.seq} k"
    assert result.raw.endswith(b"\r\n\r\n")
    assert result.response.header("Content-Length") == str(len(str(echo.process.pid)))
    streamed = echo.request(http_head("/app/stream", method="HEAD"))
    assert streamed.done == f"D {echo.seq} k"
    assert streamed.raw.endswith(b"\r\n\r\n")
    assert streamed.response.header("Transfer-Encoding") is None


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses(echo: Shim, status: int) -> None:
    result = echo.request(http_head(f"/app/status?{status}"))
    assert result.done == f"D {echo.seq} k"
    assert result.response.status == status
    assert result.raw.endswith(b"\r\n\r\n")
    assert result.response.header("Content-Length") is None


def test_connection_close_from_the_app(echo: Shim) -> None:
    result = echo.request(http_head("/app/connection-close"))
    assert result.done == f"D {echo.seq} c"
    assert result.response.header("Connection") == "close"
    assert result.response.body == b"ok"


def test_connection_close_from_the_client_and_no_k_flag(echo: Shim) -> None:
    assert echo.request(http_head("/app/pid", ("Connection", "close"))).done.endswith(" c")
    assert echo.request(http_head("/app/pid"), flags="-").done.endswith(" c")


def test_keep_alive_connection_serves_two_requests(echo: Shim) -> None:
    connection = echo.connect()
    assert echo.send(connection, http_head("/app/stream")) == f"D {echo.seq} k"
    assert echo.send(connection, http_head("/app/pid")) == f"D {echo.seq} k"
    first, rest = parse_response(connection.finish())
    second, rest = parse_response(rest)
    assert first.body == b"line 0\nline 1\nline 2\n"
    assert second.body == str(echo.process.pid).encode()
    assert rest == b""


def test_pathsend_sends_a_file(echo: Shim, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "download.bin"
    path.write_bytes(data)
    result = echo.request(http_head(f"/app/file?{path}"))
    assert result.done == f"D {echo.seq} k"
    assert result.response.header("Content-Length") == str(len(data))
    assert result.response.body == data


def test_http_disconnect_comes_only_after_the_response(echo: Shim) -> None:
    assert echo.request(http_head("/app/disconnect")).response.body == b"sent"
    after = echo.request(http_head("/app/after-response")).response.json()
    assert after == ["waiting", "http.disconnect"]


def test_an_upgrade_that_is_not_a_websocket_is_a_plain_request(echo: Shim) -> None:
    head = http_head("/app/pid", ("Upgrade", "h2c"), ("Connection", "Upgrade"))
    result = echo.request(head, flags="KU")
    assert result.done == f"D {echo.seq} c"
    assert result.response.header("Connection") == "close"
    assert result.response.body == str(echo.process.pid).encode()


# Many requests at once


def test_requests_in_flight_at_once_are_answered_in_any_order(echo: Shim) -> None:
    slow, fast = echo.connect(), echo.connect()
    started = time.monotonic()
    slow_seq = echo.submit(slow, http_head("/app/sleep?0.6"))
    fast_seq = echo.submit(fast, http_head("/app/sleep?0.1"))
    replies = echo.wait_replies(2, [slow, fast])
    elapsed = time.monotonic() - started
    assert replies == [f"D {fast_seq} k", f"D {slow_seq} k"]
    assert elapsed < 1.0  # in parallel, not 0.7 s one after the other plus overhead
    for connection in (slow, fast):
        response, rest = parse_response(connection.finish())
        assert (response.status, rest) == (200, b"")
        assert response.body == str(echo.process.pid).encode()


def test_a_hundred_requests_at_once(echo: Shim) -> None:
    connections = [echo.connect() for _ in range(100)]
    started = time.monotonic()
    seqs = {echo.submit(c, http_head("/app/sleep?0.3")) for c in connections}
    replies = echo.wait_replies(100, connections)
    assert time.monotonic() - started < 3
    assert {int(reply.split()[1]) for reply in replies} == seqs
    for connection in connections:
        assert parse_response(connection.finish())[0].status == 200


# Errors


def test_app_exception_is_a_500_without_traceback_in_production(echo: Shim) -> None:
    result = echo.request(http_head("/app/raise"))
    assert result.done == f"D {echo.seq} k"
    assert result.response.status == 500
    assert result.response.header("Content-Type") == "text/html; charset=utf-8"
    assert b"echo app raised" not in result.response.body
    assert "RuntimeError: echo app raised on purpose" in echo.log()


def test_app_exception_shows_the_traceback_in_development(spawn: Any) -> None:
    shim = spawn_echo(spawn, environment="development")
    result = shim.request(http_head("/app/raise"))
    assert result.response.status == 500
    assert b"RuntimeError: echo app raised on purpose" in result.response.body


def test_exception_after_the_response_began_closes(echo: Shim) -> None:
    connection = echo.connect()
    assert echo.send(connection, http_head("/app/raise-after-start")) == f"D {echo.seq} c"
    raw = connection.finish()
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert raw.endswith(b"7\r\npartial\r\n")  # no last chunk: the client sees a cut response
    assert "RuntimeError: raised after the response began" in echo.log()


def test_an_app_that_sends_no_response_is_a_500(echo: Shim) -> None:
    result = echo.request(http_head("/app/no-response"))
    assert result.response.status == 500
    assert "returned without completing a response" in echo.log()


def test_a_header_with_crlf_is_a_500(echo: Shim) -> None:
    result = echo.request(http_head("/app/bad-header"))
    assert result.response.status == 500
    assert b"injected" not in result.raw
    assert b"should not be sent" not in result.raw


def test_client_gone_reports_c(echo: Shim) -> None:
    logged_before = len(echo.log())
    connection = echo.connect()
    connection.reset_by_client()
    assert echo.send(connection, http_head("/app/big?400")) == f"D {echo.seq} c"
    # A client going away is routine, not an error worth a traceback.
    assert echo.log()[logged_before:] == ""


def test_a_malformed_message_reports_c_and_the_process_goes_on(echo: Shim) -> None:
    connection = echo.connect()
    echo.seq += 1
    head = http_head()
    line = f"Q {echo.seq} K 127.0.0.1 1 127.0.0.1 2 http {len(head) + 5} 0\n".encode()
    socket.send_fds(echo.control, [line + head], [connection.server.fileno()])
    assert echo.wait_done(connection) == f"D {echo.seq} c"
    assert connection.finish() == b""
    assert "protocol error" in echo.log()
    assert echo.request(http_head("/app/pid")).response.status == 200


# The access log's fields in D


def test_d_reports_status_and_body_bytes_of_a_whole_response(echo: Shim) -> None:
    result = echo.request(http_head("/app/pid"))
    assert echo.replies[-1] == f"D {echo.seq} k 200 {len(str(echo.process.pid))}"
    assert (result.status, result.size) == (200, len(result.response.body))


def test_d_reports_body_bytes_of_a_chunked_response_without_the_framing(echo: Shim) -> None:
    result = echo.request(http_head("/app/stream"))
    assert result.response.chunked
    assert result.response.body == b"line 0\nline 1\nline 2\n"
    assert echo.replies[-1] == f"D {echo.seq} k 200 21"
    big = echo.request(http_head("/app/big"))
    assert (big.status, big.size) == (200, 65536 * 160)
    length = echo.request(http_head("/app/stream-length"))
    assert (length.status, length.size) == (200, 10)


def test_d_reports_no_body_bytes_for_head(echo: Shim) -> None:
    echo.request(http_head("/app/pid", method="HEAD"))
    assert echo.replies[-1] == f"D {echo.seq} k 200 0"
    echo.request(http_head("/app/stream", method="HEAD"))
    assert echo.replies[-1] == f"D {echo.seq} k 200 0"


def test_d_reports_the_500_page_the_shim_sent(echo: Shim) -> None:
    result = echo.request(http_head("/app/raise"))
    assert echo.replies[-1] == f"D {echo.seq} k 500 {len(result.response.body)}"
    assert result.size and result.size > 0
    unanswered = echo.request(http_head("/app/no-response"))
    assert (unanswered.status, unanswered.size) == (500, len(unanswered.response.body))


def test_d_reports_a_file_sent_with_pathsend(echo: Shim, tmp_path: Path) -> None:
    path = tmp_path / "download.bin"
    path.write_bytes(os.urandom(100_000))
    result = echo.request(http_head(f"/app/file?{path}"))
    assert (result.status, result.size) == (200, 100_000)


def test_d_reports_what_was_sent_before_an_error_after_the_response_began(echo: Shim) -> None:
    connection = echo.connect()
    echo.send(connection, http_head("/app/raise-after-start"))
    assert echo.replies[-1] == f"D {echo.seq} c 200 {len(b'partial')}"
    connection.finish()


def test_d_has_no_access_log_fields_when_the_response_never_began(echo: Shim) -> None:
    connection = echo.connect()
    connection.reset_by_client()
    echo.send(connection, http_head("/app/big?400"))
    assert echo.replies[-1] == f"D {echo.seq} c"


def test_d_of_a_websocket_reports_101_and_the_frame_bytes(echo: Shim) -> None:
    connection, client, response, seq = open_websocket(echo)
    assert response.status == 101
    client.send_text("hello")
    assert client.recv_frame() == (True, 0x1, b"hello")
    client.send_close(1000)
    assert client.recv_close() == (1000, "")
    assert echo.wait_done(connection) == f"D {seq} c"
    # The echoed text frame (2 + 5 bytes) and the close frame (2 + 2).
    assert echo.replies[-1] == f"D {seq} c 101 11"


def test_d_of_a_refused_websocket_reports_its_status(echo: Shim) -> None:
    connection, _, response, seq = open_websocket(echo, "/ws/refuse")
    assert response.status == 403
    echo.wait_done(connection)
    assert echo.replies[-1] == f"D {seq} c 403 0"


def test_the_app_printing_reaches_the_log(echo: Shim) -> None:
    echo.request(http_head("/app/print"))
    assert "hello from the app's stdout" in echo.log()
    assert "and its stderr" in echo.log()


def test_a_crash_ends_the_process_with_the_request_unanswered(spawn: Any) -> None:
    shim = spawn_echo(spawn)
    connection = shim.connect()
    shim.submit(connection, http_head("/app/crash"))
    assert shim.process.wait(TIMEOUT) == 7
    assert shim.progress() == 0  # nothing was sent: the core would answer 502


# Lifespan and stopping


def test_lifespan_startup_before_ready_and_shutdown_on_eof(spawn: Any) -> None:
    shim = spawn_echo(spawn)
    markers = markers_of(shim)
    assert (markers / "startup").read_text() == str(shim.process.pid)
    assert not (markers / "shutdown").exists()
    shim.control.close()
    assert shim.process.wait(TIMEOUT) == 0
    assert (markers / "shutdown").read_text() == str(shim.process.pid)


def test_eof_lets_requests_in_flight_finish_before_the_shutdown(spawn: Any) -> None:
    shim = spawn_echo(spawn)
    connection = shim.connect()
    seq = shim.submit(connection, http_head("/app/sleep?0.3"))
    time.sleep(0.1)
    shim.control.shutdown(socket.SHUT_WR)  # EOF for the shim; its D can still come back
    assert shim.wait_done(connection) == f"D {seq} k"
    assert parse_response(connection.finish())[0].status == 200
    assert shim.process.wait(TIMEOUT) == 0
    assert (markers_of(shim) / "shutdown").exists()


def test_sigterm_while_idle_exits_0_promptly_after_the_shutdown(spawn: Any) -> None:
    shim = spawn_echo(spawn)
    started = time.monotonic()
    shim.process.send_signal(signal.SIGTERM)
    assert shim.process.wait(TIMEOUT) == 0
    assert time.monotonic() - started < 2
    assert (markers_of(shim) / "shutdown").exists()


def test_sigterm_during_a_request_finishes_it_first(spawn: Any) -> None:
    shim = spawn_echo(spawn)
    connection = shim.connect()
    seq = shim.submit(connection, http_head("/app/sleep?0.3"))
    time.sleep(0.1)
    shim.process.send_signal(signal.SIGTERM)
    assert shim.wait_done(connection) == f"D {seq} k"
    assert parse_response(connection.finish())[0].body == str(shim.process.pid).encode()
    assert shim.process.wait(TIMEOUT) == 0


def test_lifespan_startup_failed_is_an_error_in_load_app(spawn: Any) -> None:
    app = """
        async def app(scope, receive, send):
            assert scope["type"] == "lifespan"
            await receive()
            await send({"type": "lifespan.startup.failed", "message": "no database"})
    """
    shim, tag, payload = spawn({"app.py": app}, "app.py", app_type="python")
    assert (tag, payload["step"]) == ("ERROR", "LOAD_APP")
    assert payload["message"] == "lifespan startup failed: no database"
    assert shim.process.wait(TIMEOUT) == 1


def test_lifespan_startup_raising_is_an_error_in_load_app(spawn: Any) -> None:
    app = """
        async def app(scope, receive, send):
            await receive()
            raise ConnectionRefusedError("database down")
    """
    shim, tag, payload = spawn({"app.py": app}, "app.py", app_type="python")
    assert (tag, payload["step"]) == ("ERROR", "LOAD_APP")
    assert payload["message"] == ("lifespan startup failed: ConnectionRefusedError: database down")
    assert "database down" in payload["traceback"]
    assert shim.process.wait(TIMEOUT) == 1


def test_an_app_without_lifespan_support_is_served_anyway(spawn: Any) -> None:
    app = """
        async def app(scope, receive, send):
            if scope["type"] != "http":
                raise ValueError(f"cannot handle {scope['type']}")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"no lifespan"})
    """
    shim, tag, payload = spawn({"app.py": app}, "app.py", app_type="python")
    assert tag == "READY", payload
    assert "does not support the lifespan protocol" in shim.log()
    assert shim.request(http_head()).response.body == b"no lifespan"
    shim.control.close()
    assert shim.process.wait(TIMEOUT) == 0


# WebSockets


def test_websocket_echo(echo: Shim) -> None:
    connection, client, response, seq = open_websocket(
        echo, "/ws", ("Sec-WebSocket-Protocol", "chat, superchat")
    )
    assert response.status == 101
    assert (response.header("upgrade") or "").lower() == "websocket"
    assert response.header("sec-websocket-protocol") == "chat"
    assert response.header("x-echo") == "yes"
    assert echo.progress() == seq

    client.send_text("hello")
    assert client.recv_frame() == (True, 0x1, b"hello")
    client.send_frame(0x2, b"\x00\x01binary")
    assert client.recv_frame() == (True, 0x2, b"\x00\x01binary")
    # A fragmented message, with a ping between its fragments.
    client.send_frame(0x1, b"frag", fin=False)
    client.send_frame(0x9, b"are you there")
    client.send_frame(0x0, "mented \u00e9".encode(), fin=False)
    client.send_frame(0x0, b"!")
    assert client.recv_frame() == (True, 0xA, b"are you there")
    assert client.recv_frame() == (True, 0x1, "fragmented \u00e9!".encode())
    big = os.urandom(3 * 1024 * 1024)
    client.send_frame(0x2, big)
    assert client.recv_frame() == (True, 0x2, big)

    client.send_close(1000)
    assert client.recv_close() == (1000, "")
    assert echo.wait_done(connection) == f"D {seq} c"
    # The shim closed its copy; the core closes the connection after the D.
    connection.server.close()
    assert client.at_eof()
    markers = echo.log_path.parent / "markers"
    assert (markers / "ws-disconnect").read_text() == "1000"


def test_websocket_scope(echo: Shim) -> None:
    connection, client, response, seq = open_websocket(echo, "/ws/scope?x=1", scheme="https")
    assert response.status == 101
    scope = json.loads(client.recv_frame()[2])
    assert scope["type"] == "websocket"
    assert scope["scheme"] == "wss"
    assert scope["path"] == "/ws/scope"
    assert scope["query_string"] == "x=1"
    assert scope["subprotocols"] == []
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    assert ["upgrade", "websocket"] in scope["headers"]
    client.send_close(1001)
    assert client.recv_close() == (1001, "")
    assert echo.wait_done(connection) == f"D {seq} c"


def test_websocket_closed_by_the_app(echo: Shim) -> None:
    connection, client, _, seq = open_websocket(echo)
    client.send_text("close")
    assert client.recv_close() == (4000, "asked to")
    client.send_close(4000)
    assert echo.wait_done(connection) == f"D {seq} c"


def test_websocket_refused_before_accept_is_a_403(echo: Shim) -> None:
    connection, client, response, seq = open_websocket(echo, "/ws/refuse")
    assert response.status == 403
    assert echo.wait_done(connection) == f"D {seq} c"


def test_websocket_app_raising_before_accept_is_a_500(echo: Shim) -> None:
    connection, client, response, seq = open_websocket(echo, "/ws/raise")
    assert response.status == 500
    assert echo.wait_done(connection) == f"D {seq} c"
    assert "websocket handler raised before accepting" in echo.log()


def test_websocket_app_raising_after_accept_closes_with_1011(echo: Shim) -> None:
    connection, client, _, seq = open_websocket(echo)
    client.send_text("raise")
    assert client.recv_close()[0] == 1011
    client.send_close(1011)
    assert echo.wait_done(connection) == f"D {seq} c"


def test_websocket_wrong_version_is_refused_without_the_app(echo: Shim) -> None:
    connection = echo.connect()
    seq = echo.submit(connection, ws_head("/ws", version="8"), flags="U")
    assert echo.wait_done(connection) == f"D {seq} c"
    response, _ = parse_response(connection.finish(), head_request=True)
    assert response.status == 426
    assert response.header("sec-websocket-version") == "13"


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([(0x1, b"unmasked", False)], 1002),
        ([(0x1, b"\xff\xfe not utf-8", True)], 1007),
        ([(0x0, b"continuation of nothing", True)], 1002),
        ([(0x3, b"reserved opcode", True)], 1002),
    ],
)
def test_websocket_protocol_errors_close_with_their_code(
    echo: Shim, frames: list[tuple[int, bytes, bool]], code: int
) -> None:
    connection, client, _, seq = open_websocket(echo)
    for opcode, payload, masked in frames:
        client.send_frame(opcode, payload, masked=masked)
    assert client.recv_close()[0] == code
    assert echo.wait_done(connection) == f"D {seq} c"


def test_websocket_message_over_16_mib_closes_with_1009(echo: Shim) -> None:
    connection, client, _, seq = open_websocket(echo)
    # Refused from the frame's header: the 17 MiB need not be sent.
    client.sock.sendall(struct.pack("!BBQ", 0x82, 0x80 | 127, 17 * 1024 * 1024) + os.urandom(4))
    assert client.recv_close()[0] == 1009
    assert echo.wait_done(connection) == f"D {seq} c"


def test_websocket_client_gone_without_close(echo: Shim) -> None:
    connection, client, _, seq = open_websocket(echo)
    connection.reset_by_client()
    assert echo.wait_done(connection) == f"D {seq} c"
    markers = echo.log_path.parent / "markers"
    wait_for(lambda: (markers / "ws-disconnect").read_text() == "1006", "disconnect 1006")


def test_stopping_closes_open_websockets_with_1012(spawn: Any) -> None:
    shim = spawn_echo(spawn)
    connection, client, _, seq = open_websocket(shim)
    shim.control.shutdown(socket.SHUT_WR)
    assert client.recv_close()[0] == 1012
    client.send_close(1012)
    assert shim.wait_done(connection) == f"D {seq} c"
    assert shim.process.wait(TIMEOUT) == 0
    assert (markers_of(shim) / "ws-disconnect").read_text() == "1012"


def test_an_upgrade_to_a_wsgi_app_is_a_plain_request(spawn: Any) -> None:
    app = """
        def application(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [environ.get("HTTP_UPGRADE", "").encode()]
    """
    shim, tag, _ = spawn({"app.py": app}, "app.py", app_type="python")
    assert tag == "READY"
    result = shim.request(ws_head("/"), flags="KU")
    assert result.done == f"D {shim.seq} c"
    assert result.response.header("Connection") == "close"
    assert result.response.body == b"websocket"


# Real frameworks


@pytest.fixture(scope="module")
def fastapi_shim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shim]:
    pytest.importorskip("fastapi")
    root = tmp_path_factory.mktemp("fastapi_app")
    shutil.copy(FASTAPI_APP, root / "app.py")
    shim = start_shim(root)
    try:
        tag, payload = shim.handshake(
            app_root=str(root),
            startup_file=str(root / "app.py"),
            app_type="python",
            base_uri="/api",
        )
        assert (tag, payload.get("app_type")) == ("READY", "asgi"), payload
        yield shim
    finally:
        shim.stop()


def test_fastapi_path_and_query_parameters(fastapi_shim: Shim) -> None:
    result = fastapi_shim.request(http_head("/api/items/42?q=hello"))
    assert result.done == f"D {fastapi_shim.seq} k"
    assert result.response.json() == {"item_id": 42, "q": "hello"}
    assert fastapi_shim.request(http_head("/api/items/nope")).response.status == 422


def test_fastapi_json_body_with_a_pydantic_model(fastapi_shim: Shim) -> None:
    body = json.dumps({"name": "widget", "price": 2.5, "tags": ["a", "b"]}).encode()
    head = http_head("/api/items", ("Content-Type", "application/json"), method="POST")
    response = fastapi_shim.request(head, body).response
    assert response.json() == {"name": "widget", "double": 5.0, "tags": ["a", "b"]}
    invalid = fastapi_shim.request(head, b'{"name": "widget"}').response
    assert invalid.status == 422


def test_fastapi_lifespan_state_and_root_path(fastapi_shim: Shim) -> None:
    response = fastapi_shim.request(http_head("/api/state")).response
    assert response.json() == {
        "greeting": "hello from the lifespan",
        "url": "http://example.test:8080/api/state",
        "root_path": "/api",
        "url_for": "http://example.test:8080/api/state",
    }


def test_fastapi_sync_endpoint_runs_in_a_worker_thread(fastapi_shim: Shim) -> None:
    assert fastapi_shim.request(http_head("/api/sync")).response.json() == {"main_thread": False}


def test_fastapi_streaming_response(fastapi_shim: Shim) -> None:
    result = fastapi_shim.request(http_head("/api/stream"))
    assert result.done == f"D {fastapi_shim.seq} k"
    assert result.response.chunked
    assert result.response.body == b"".join(b"chunk %d\n" % i for i in range(5))


def test_fastapi_file_response(fastapi_shim: Shim) -> None:
    result = fastapi_shim.request(http_head("/api/file"))
    assert result.done == f"D {fastapi_shim.seq} k"
    assert result.response.body == FASTAPI_APP.read_bytes()


def test_fastapi_error_is_a_500(fastapi_shim: Shim) -> None:
    result = fastapi_shim.request(http_head("/api/fail"))
    assert result.response.status == 500
    assert "fastapi endpoint failed on purpose" in fastapi_shim.log()


def test_fastapi_websocket(fastapi_shim: Shim) -> None:
    connection, client, response, seq = open_websocket(fastapi_shim, "/api/ws")
    assert response.status == 101
    client.send_text("ping")
    assert json.loads(client.recv_frame()[2]) == {
        "echo": "ping",
        "greeting": "hello from the lifespan",
    }
    client.send_close(1000)
    assert client.recv_close()[0] == 1000
    assert fastapi_shim.wait_done(connection) == f"D {seq} c"


def test_starlette_app(spawn: Any) -> None:
    pytest.importorskip("starlette")
    files = {"app.py": STARLETTE_APP, "static/hello.txt": "static hello\n"}
    shim, tag, payload = spawn(files, "app.py", app_type="python")
    assert (tag, payload.get("app_type")) == ("READY", "asgi"), payload
    assert shim.request(http_head("/")).response.body == b"home of /"
    info = shim.request(http_head("/info?a=1")).response.json()
    assert info == {
        "url": "http://example.test:8080/info?a=1",
        "query": {"a": "1"},
        "opened": "by the lifespan",
        "client": ["192.0.2.7", 54321],
    }
    body = os.urandom(100_000)
    assert shim.request(http_head("/body", method="POST"), body).response.body == body
    static = shim.request(http_head("/static/hello.txt"))
    assert static.response.body == b"static hello\n"
    assert static.done == f"D {shim.seq} k"

    connection, client, response, seq = open_websocket(
        shim, "/chat", ("Sec-WebSocket-Protocol", "chat")
    )
    assert (response.status, response.header("sec-websocket-protocol")) == (101, "chat")
    client.send_text("shout")
    assert client.recv_frame() == (True, 0x1, b"SHOUT")
    client.send_close(1000)
    assert client.recv_close()[0] == 1000
    assert shim.wait_done(connection) == f"D {seq} c"
