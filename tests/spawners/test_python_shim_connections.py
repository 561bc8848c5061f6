"""Whole connections for the Python shim's ASGI server (docs/protocol/handoff.md, "Whole
connections"), driven over the real protocol: the test plays the core, hands the shim loopback TCP
connections with ``C`` and the bytes "already read", then talks HTTP on the client's end while
reading the shim's ``X``, ``N`` and ``L`` reports.

Every test runs twice: with httptools parsing the requests, and with the shim's pure-Python parser
(``APPMANAGER_PYTHON_HTTP_PARSER=python``), which must behave the same.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from python_shim import TIMEOUT, Client, Shim, closed_report, get, hand, start_shim

APPS = Path(__file__).resolve().parents[1] / "apps"
ECHO_ASGI = APPS / "echo_asgi" / "app.py"

PARSERS = ["httptools", "python"]


@pytest.fixture(params=PARSERS)
def parser(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "httptools":
        pytest.importorskip("httptools")
    return name


@pytest.fixture
def spawn(tmp_path: Path, parser: str) -> Iterator[Any]:
    """``spawn(**spawn_fields)``: a shim on the ASGI echo app with the parser under test."""
    shims: list[Shim] = []

    def start(**config: Any) -> Shim:
        root = tmp_path / f"app{len(shims)}"
        root.mkdir()
        shutil.copy(ECHO_ASGI, root / "app.py")
        env = {"APPMANAGER_PYTHON_HTTP_PARSER": parser}
        shim = start_shim(root, env)
        shims.append(shim)
        tag, payload = shim.handshake(
            app_root=str(root), startup_file=str(root / "app.py"), app_type="python", **config
        )
        assert tag == "READY", payload
        assert payload["connections"] is True
        return shim

    try:
        yield start
    finally:
        for shim in shims:
            shim.stop()


# Keep-alive, pipelining, bodies


def test_many_requests_on_one_connection(spawn: Any) -> None:
    shim = spawn()
    connection, client, seq = hand(shim, get("/conformance?n=0"))
    for i in range(50):
        if i:
            client.send(get(f"/conformance?n={i}"))
        response = client.read()
        assert response.status == 200
        assert response.json()["query"] == f"n={i}"
    pids = set()
    for _ in range(3):
        client.send(get("/app/pid"))
        pids.add(client.read().body)
    assert pids == {str(shim.process.pid).encode()}
    connection.client.shutdown(socket.SHUT_WR)  # the client is done
    assert client.at_eof()
    assert closed_report(shim, seq, [connection]) == 53
    assert shim.slot(0)[1] == 0


def test_pipelined_requests_are_answered_in_order(spawn: Any) -> None:
    shim = spawn()
    requests = b"".join(get(f"/conformance?n={i}") for i in range(20))
    # The core read the first few; the rest arrive on the socket.
    connection, client, _ = hand(shim, requests[:100])
    client.send(requests[100:])
    queries = [client.read().json()["query"] for _ in range(20)]
    assert queries == [f"n={i}" for i in range(20)]
    # Slow and fast requests pipelined still come back in order.
    client.send(get("/app/sleep?0.3") + get("/conformance?n=fast"))
    assert client.read().body == str(shim.process.pid).encode()
    assert client.read().json()["query"] == "n=fast"


def test_a_long_pipeline_in_one_read(spawn: Any) -> None:
    shim = spawn()
    requests = b"GET /app/pid HTTP/1.1\r\nHost: t\r\n\r\n" * 3000
    connection, client, seq = hand(shim, requests[:38])
    client.send(requests[38:])
    pid = str(shim.process.pid).encode()
    bodies = [client.read().body for _ in range(3000)]
    assert bodies == [pid] * 3000, {b[:80] for b in bodies}
    client.sock.close()
    # Reported a hundred at a time with N, so X has none left to report.
    assert closed_report(shim, seq, [connection]) == 0
    assert shim.replies.count("N 100") == 30


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_10_mb_upload_arrives_intact(spawn: Any, framing: str) -> None:
    shim = spawn()
    body = os.urandom(10 * 1024 * 1024)
    if framing == "chunked":
        header = "Transfer-Encoding: chunked"
        payload = (
            b"".join(
                b"%x\r\n%b\r\n" % (len(body[i : i + 999_999]), body[i : i + 999_999])
                for i in range(0, len(body), 999_999)
            )
            + b"0\r\n\r\n"
        )
    else:
        header = f"Content-Length: {len(body)}"
        payload = body
    head = get("/conformance", header, method="POST")
    # The core read the head and the start of the body.
    connection, client, _ = hand(shim, head + payload[:5000])
    client.send(payload[5000:] + get("/conformance?after"))
    data = client.read().json()
    assert data["body_len"] == len(body)
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert client.read().json()["query"] == "after"


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


def test_expect_100_continue_is_answered_when_the_app_reads_the_body(spawn: Any) -> None:
    shim = spawn()
    head = get("/conformance", "Content-Length: 5", "Expect: 100-continue", method="POST")
    connection, client, _ = hand(shim, head)
    assert client.read_interim() == b"HTTP/1.1 100 Continue"
    client.send(b"hello")
    assert client.read().json()["body_len"] == 5


def test_head_and_bodiless_statuses_send_no_body(spawn: Any) -> None:
    shim = spawn()
    connection, client, _ = hand(shim, get("/app/stream", method="HEAD") + get("/app/status?204"))
    client.send(get("/conformance?after"))
    head = client.read(head_request=True)
    assert head.status == 200
    assert client.read().status == 204
    assert client.read().json()["query"] == "after"


def test_connection_close_and_http10(spawn: Any) -> None:
    shim = spawn()
    connection, client, seq = hand(shim, get("/conformance", "Connection: close"))
    response = client.read()
    assert response.header("connection") == "close"
    assert client.at_eof()
    assert closed_report(shim, seq, [connection]) == 1
    connection, client, seq = hand(shim, get("/conformance", version="HTTP/1.0"), slot=1)
    assert client.read().status == 200
    assert client.at_eof()
    connection, client, seq = hand(
        shim, get("/conformance", "Connection: keep-alive", version="HTTP/1.0"), slot=2
    )
    response = client.read()
    assert response.header("connection") == "keep-alive"
    client.send(get("/conformance?again", "Connection: keep-alive", version="HTTP/1.0"))
    assert client.read().json()["query"] == "again"


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


def test_a_long_start_comes_in_a_file(spawn: Any) -> None:
    shim = spawn()
    body = os.urandom(200_000)
    head = get("/conformance", f"Content-Length: {len(body)}", method="POST")
    connection, client, _ = hand(shim, head + body, in_file=True)
    assert client.read().json()["body_sha256"] == hashlib.sha256(body).hexdigest()


# What the core would refuse


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nContent-Length: 9999999999999\r\n\r\n", 413),
        (b"GET / HTTP/1.1\r\nExpect: something\r\n\r\n", 417),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    ],
    ids=["garbage", "bad-header", "both-framings", "gzip", "too-large", "expect", "big-head"],
)
def test_refused_after_a_good_request(spawn: Any, request_bytes: bytes, status: int) -> None:
    shim = spawn()
    connection, client, seq = hand(shim, get("/conformance?first"))
    assert client.read().json()["query"] == "first"
    client.send(request_bytes)
    response = client.read()
    assert response.status == status
    assert response.header("connection") == "close"
    assert client.at_eof()
    # The refused request is not counted, as the core counts none it refuses.
    assert closed_report(shim, seq, [connection]) == 1


def test_an_endless_head_is_refused(spawn: Any) -> None:
    shim = spawn()
    connection, client, _ = hand(shim, get("/conformance"))
    assert client.read().status == 200
    client.send(b"GET / HTTP/1.1\r\nX-Endless: ")
    try:
        for _ in range(20):
            client.send(b"a" * 8192)
    except OSError:
        pass  # the server stopped reading, as it should
    assert client.read().status == 431


# The progress file, the reports, stopping


def test_slot_says_received_while_the_app_works_then_idle(spawn: Any) -> None:
    shim = spawn()
    connection, client, _ = hand(shim, get("/app/sleep?0.5"), slot=3)
    time.sleep(0.2)
    assert shim.slot(3) == (1, 1)
    assert client.read().status == 200
    client.send(get("/app/sleep?0.5"))
    time.sleep(0.2)
    assert shim.slot(3) == (2, 1)
    assert client.read().status == 200
    time.sleep(0.05)
    assert shim.slot(3) == (2, 0)


def test_access_log_reports_each_response(spawn: Any) -> None:
    shim = spawn(access_log=True)
    first = get("/hello?x=1", "Referer: http://ref.test/", "User-Agent: tester/1.0")
    connection, client, seq = hand(shim, first)
    client.read()
    client.send(get("/app/stream", method="HEAD"))
    client.read(head_request=True)
    line = shim.wait_report("L ", [connection])
    head, request, referer, agent = line.split("\n")
    fields = head.split(" ")
    assert fields[:2] == ["L", str(seq)] and fields[2] == "200" and int(fields[3]) > 0
    assert request == "GET /hello?x=1 HTTP/1.1"
    assert (referer, agent) == ("http://ref.test/", "tester/1.0")
    line = shim.wait_report("L ", [connection])
    assert line.split("\n")[0] == f"L {seq} 200 0"
    assert line.split("\n")[1:] == ["HEAD /app/stream HTTP/1.1", "", ""]


def test_requests_are_counted_often_enough_for_max_requests(spawn: Any) -> None:
    shim = spawn(max_requests=10)
    connection, client, seq = hand(shim, get("/app/pid"))
    client.read()
    for _ in range(2):
        client.send(get("/app/pid"))
        client.read()
    # max_requests 10: a report per request (a tenth of the limit).
    assert [shim.wait_report("N ", [connection]) for _ in range(3)] == ["N 1"] * 3
    connection.client.close()
    assert closed_report(shim, seq, [connection]) == 0


def test_stop_closes_idle_connections_and_finishes_busy_ones(spawn: Any) -> None:
    shim = spawn()
    idle, idle_client, idle_seq = hand(shim, get("/conformance"), slot=0)
    assert idle_client.read().status == 200
    busy, busy_client, busy_seq = hand(shim, get("/app/sleep?0.5"), slot=1)
    time.sleep(0.1)
    shim.control.shutdown(socket.SHUT_WR)  # what the core does to stop a process
    assert idle_client.at_eof()
    response = busy_client.read()
    assert response.status == 200
    assert response.header("connection") == "close"
    assert busy_client.at_eof()
    reports = {shim.wait_report("X ", [idle, busy]).split(" ")[1] for _ in range(2)}
    assert reports == {str(idle_seq), str(busy_seq)}
    assert shim.process.wait(TIMEOUT) == 0


def test_client_gone_mid_body_is_a_disconnect(spawn: Any) -> None:
    shim = spawn()
    head = get("/conformance", "Content-Length: 100000", method="POST")
    connection, client, seq = hand(shim, head + b"x" * 1000)
    connection.reset_by_client()
    closed_report(shim, seq, [])
    # The process serves on.
    other, other_client, _ = hand(shim, get("/conformance"), slot=1)
    assert other_client.read().status == 200


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


def test_protocol_error_in_a_c_message_is_answered_x(spawn: Any) -> None:
    shim = spawn()
    connection = shim.connect()
    socket.send_fds(shim.control, [b"C 77 0 - nonsense\n"], [connection.server.fileno()])
    assert shim.wait_report("X 77 ") == "X 77 0"
    assert "protocol error" in shim.log()
