"""Whole connections for the Ruby shim (docs/protocol/handoff.md, "Whole connections (ASGI,
Rack)" and "One request at a time: giving connections back"), driven over the real protocol as
test_python_shim_connections.py drives the ASGI server: the test plays the core, hands the shim
loopback TCP connections with ``C`` and the bytes "already read", then talks HTTP on the client's
end while reading the shim's ``X``, ``N``, ``L`` reports and its ``S``, ``B``, ``R`` messages.
Requests go to ``tests/apps/echo_rack``.

The test keeps its own copy of every connection it hands over, as the core does: after ``B`` the
connection must still work through that copy, unread and not shut down by the shim.
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from python_shim import TIMEOUT, Client, Connection, closed_report, get, hand
from test_ruby_shim_protocol import APPS, RUBY, Shim, start_shim

pytestmark = pytest.mark.skipif(RUBY is None, reason="no ruby interpreter on PATH")

ECHO_RACK = APPS / "echo_rack"
# The seq of the Q path, then an 8-byte slot per connection: the file the core gives the process.
PROGRESS_SIZE = 8 + 8 * 65536
# How long a request runs before the shim says it is busy (S).
BUSY_AFTER = 0.05


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """``spawn(**spawn_fields)``: a shim on the Rack echo app that answered READY."""
    shims: list[Shim] = []

    def start(**config: Any) -> Shim:
        log_dir = tmp_path / f"shim{len(shims)}"
        log_dir.mkdir()
        shim = start_shim(ECHO_RACK, log_dir, progress_size=PROGRESS_SIZE)
        shims.append(shim)
        tag, payload = shim.handshake(
            app_root=str(ECHO_RACK), startup_file=str(ECHO_RACK / "config.ru"), **config
        )
        assert tag == "READY", f"{payload}\n{shim.log()}"
        return shim

    try:
        yield start
    finally:
        for shim in shims:
            shim.stop()


def reports_until(shim: Shim, prefix: str) -> list[str]:
    """The shim's messages up to the first that starts with ``prefix``, that one included."""
    messages: list[str] = []
    while True:
        message = shim.next_report()
        assert message, f"control channel closed before {prefix!r} came: {messages}\n{shim.log()}"
        messages.append(message)
        if message.startswith(prefix):
            return messages


def reports_until_exit(shim: Shim) -> list[str]:
    """Every message the shim sends until it closes the control channel (exits)."""
    messages: list[str] = []
    while message := shim.next_report():
        messages.append(message)
    return messages


def counted(messages: list[str]) -> int:
    """The requests that ``N``, ``X`` and ``B`` messages report, added up."""
    total = 0
    for message in messages:
        fields = message.partition("\n")[0].split(" ")
        if fields[0] == "N":
            total += int(fields[1])
        elif fields[0] in ("X", "B"):
            total += int(fields[2])
    return total


def given_back(messages: list[str]) -> dict[int, bytes]:
    """The connections that ``B`` messages gave back: seq -> the bytes read and not served."""
    back: dict[int, bytes] = {}
    for message in messages:
        if message.startswith("B "):
            head, _, data = message.partition("\n")
            _, seq, requests = head.split(" ")
            assert requests.isdigit(), message
            assert int(seq) not in back, f"connection {seq} given back twice: {messages}"
            back[int(seq)] = data.encode("latin-1")
    return back


def closed(messages: list[str]) -> set[int]:
    """The connections that ``X`` messages closed."""
    return {int(m.split(" ")[1]) for m in messages if m.startswith("X ")}


def wait_slot(shim: Shim, slot: int, expected: tuple[int, int]) -> None:
    """Waits for a slot to say ``expected``: the shim writes it once the response's last byte is
    out, which the client may read first."""
    deadline = time.monotonic() + TIMEOUT
    while shim.slot(slot) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert shim.slot(slot) == expected


def assert_the_cores_again(connection: Connection, client: Client, unread: bytes) -> None:
    """The shim let go of the connection without shutdown and reads it no more: ``unread``, sent
    by the client after the give-back, was neither answered nor read and waits in the core's copy,
    which still carries bytes both ways."""
    time.sleep(0.3)
    assert client.buf == b""
    assert not select.select([client.sock], [], [], 0)[0], "answered or shut down after B"
    try:
        data = connection.server.recv(1 << 16)
    except BlockingIOError:
        data = b""
    assert data == unread, "the shim read the connection after giving it back"
    connection.server.sendall(b"from the core")
    assert client.sock.recv(1 << 16) == b"from the core"


def test_ready_says_connections_and_concurrency_1(tmp_path: Path) -> None:
    shim = start_shim(ECHO_RACK, tmp_path, progress_size=PROGRESS_SIZE)
    try:
        tag, payload = shim.handshake(
            app_root=str(ECHO_RACK), startup_file=str(ECHO_RACK / "config.ru")
        )
        assert tag == "READY", f"{payload}\n{shim.log()}"
        assert payload["connections"] is True
        assert payload["concurrency"] == 1
        assert payload["pid"] == shim.process.pid
    finally:
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
    assert shim.slot(0) == (53, 0)


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


def test_requests_on_several_connections_are_all_served(spawn: Any) -> None:
    shim = spawn()
    held = [hand(shim, get(f"/conformance?c={i}&r=0"), slot=i) for i in range(4)]
    for i, (_, client, _) in enumerate(held):
        assert client.read().json()["query"] == f"c={i}&r=0"
    # Interleaved: every connection sends before any is read.
    for i, (_, client, _) in reversed(list(enumerate(held))):
        client.send(get(f"/conformance?c={i}&r=1"))
    for i, (_, client, _) in enumerate(held):
        assert client.read().json()["query"] == f"c={i}&r=1"
    for i in range(4):
        wait_slot(shim, i, (2, 0))


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


def test_expect_100_continue_is_answered_when_the_body_is_not_there_yet(spawn: Any) -> None:
    shim = spawn()
    head = get("/conformance", "Content-Length: 5", "Expect: 100-continue", method="POST")
    connection, client, _ = hand(shim, head)
    assert client.read_interim() == b"HTTP/1.1 100 Continue"
    client.send(b"hello")
    data = client.read().json()
    assert data["body_len"] == 5
    assert data["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    # Again on the same connection, the head arriving on the socket this time.
    client.send(head)
    assert client.read_interim() == b"HTTP/1.1 100 Continue"
    client.send(b"again")
    assert client.read().json()["body_sha256"] == hashlib.sha256(b"again").hexdigest()


def test_head_and_bodiless_statuses_send_no_body(spawn: Any) -> None:
    shim = spawn()
    connection, client, _ = hand(shim, get("/app/stream", method="HEAD") + get("/app/status?204"))
    client.send(get("/app/status?304") + get("/conformance?after"))
    head = client.read(head_request=True)
    assert head.status == 200
    assert client.read().status == 204
    assert client.read().status == 304
    # Any body bytes sent with the three would come before this response.
    assert client.read().json()["query"] == "after"


def test_connection_close_and_http10(spawn: Any) -> None:
    shim = spawn()
    connection, client, seq = hand(shim, get("/conformance", "Connection: close"))
    response = client.read()
    assert response.header("connection") == "close"
    assert client.at_eof()
    assert closed_report(shim, seq, [connection]) == 1
    connection, client, seq = hand(shim, get("/conformance", version="HTTP/1.0"), slot=1)
    response = client.read()
    assert response.status == 200
    assert response.header("connection") == "close"
    assert client.at_eof()
    assert closed_report(shim, seq, [connection]) == 1
    connection, client, seq = hand(
        shim, get("/conformance", "Connection: keep-alive", version="HTTP/1.0"), slot=2
    )
    response = client.read()
    assert response.header("connection") == "keep-alive"
    client.send(get("/conformance?again", "Connection: keep-alive", version="HTTP/1.0"))
    assert client.read().json()["query"] == "again"
    # A body of unknown length on HTTP/1.0 ends with the connection, keep-alive or not.
    client.send(get("/app/stream", "Connection: keep-alive", version="HTTP/1.0"))
    response = client.read()
    assert response.body == b"line 0\nline 1\nline 2\n"
    assert client.at_eof()
    assert closed_report(shim, seq, [connection]) == 3


def test_connection_close_from_the_app_closes(spawn: Any) -> None:
    shim = spawn()
    connection, client, seq = hand(shim, get("/conformance"))
    assert client.read().status == 200
    client.send(get("/app/connection-close"))
    response = client.read()
    assert response.header("connection") == "close"
    assert response.body == b"ok"
    assert client.at_eof()
    assert closed_report(shim, seq, [connection]) == 2


def test_env_has_the_addresses_the_scheme_and_the_base_uri(spawn: Any) -> None:
    shim = spawn(base_uri="/base/")
    connection, client, _ = hand(shim, get("/base/echo?q=1"), scheme="https")
    client.send(get("/base/echo?q=2", "Content-Length: 5", method="POST") + b"hello")
    for query in ("q=1", "q=2"):
        env = client.read().json()
        assert env["SCRIPT_NAME"] == "/base"
        assert env["PATH_INFO"] == "/echo"
        assert env["QUERY_STRING"] == query
        assert env["rack.url_scheme"] == "https"
        assert env["SERVER_PORT"] == "8000"
        assert env["REMOTE_ADDR"] == "192.0.2.7"
        assert env["REMOTE_PORT"] == "54321"
        assert env["HTTP_HOST"] == "example.test"
        assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["REQUEST_METHOD"] == "POST"
    assert env["CONTENT_LENGTH"] == "5"
    assert env["body"] == "hello"


def test_a_long_start_comes_in_a_file(spawn: Any) -> None:
    shim = spawn()
    body = os.urandom(200_000)
    head = get("/conformance", f"Content-Length: {len(body)}", method="POST")
    connection, client, _ = hand(shim, head + body + get("/conformance?next"), in_file=True)
    assert client.read().json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert client.read().json()["query"] == "next"


# What the core would refuse


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nNo-Colon-Here\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nContent-Length: 9999999999999\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nContent-Length: 1073741825\r\n\r\n", 413),
        (b"GET / HTTP/1.1\r\nExpect: something\r\n\r\n", 417),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    ],
    ids=[
        "garbage",
        "bad-header",
        "no-colon",
        "both-framings",
        "two-lengths",
        "bad-chunk-size",
        "gzip",
        "too-large",
        "1-gib-and-a-byte",
        "expect",
        "big-head",
    ],
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


# The progress file and the reports


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
    wait_slot(shim, 3, (2, 0))


def test_access_log_reports_each_response_before_x(spawn: Any) -> None:
    shim = spawn(access_log=True)
    first = get("/hello?x=1", "Referer: http://ref.test/", "User-Agent: tester/1.0")
    connection, client, seq = hand(shim, first)
    echoed = client.read()
    client.send(get("/app/stream", method="HEAD"))
    client.read(head_request=True)
    client.send(get("/app/raise"))
    failed = client.read()
    assert failed.status == 500
    connection.client.shutdown(socket.SHUT_WR)
    assert client.at_eof()
    messages = reports_until(shim, f"X {seq} ")
    logs = [m for m in messages if m.startswith("L ")]
    assert len(logs) == 3, messages
    head, request, referer, agent = logs[0].split("\n")
    assert head == f"L {seq} 200 {len(echoed.body)}"
    assert request == "GET /hello?x=1 HTTP/1.1"
    assert (referer, agent) == ("http://ref.test/", "tester/1.0")
    assert logs[1].split("\n") == [f"L {seq} 200 0", "HEAD /app/stream HTTP/1.1", "", ""]
    assert logs[2].split("\n") == [
        f"L {seq} 500 {len(failed.body)}",
        "GET /app/raise HTTP/1.1",
        "",
        "",
    ]
    # The shim's 500 page is a response ended, and counted.
    assert counted(messages) == 3, messages


@pytest.mark.parametrize(("max_requests", "every"), [(10, 1), (30, 3)])
def test_requests_are_counted_often_enough_for_max_requests(
    spawn: Any, max_requests: int, every: int
) -> None:
    shim = spawn(max_requests=max_requests)
    connection, client, seq = hand(shim, get("/app/pid"))
    client.read()
    for _ in range(6):
        client.send(get("/app/pid"))
        client.read()
    # A report every tenth of the limit; the rest comes with X.
    connection.client.close()
    messages = reports_until(shim, f"X {seq} ")
    assert [m for m in messages if m.startswith("N ")] == [f"N {every}"] * (7 // every)
    assert messages[-1] == f"X {seq} {7 % every}"


def test_past_the_request_ceiling_connections_go_back_until_the_core_retires_it(
    spawn: Any,
) -> None:
    """max_requests 10: the core retires the process after 10 to 11 requests (staggered). A core
    too busy to read the counts in time must not let it serve more: past 11 the shim gives its
    connections back, then still gives back what the core sends, and exits only at EOF."""
    shim = spawn(max_requests=10)
    connection, client, seq = hand(shim, get("/app/pid"))
    client.read()
    for _ in range(10):
        client.send(get("/app/pid"))
        client.read()
    messages = reports_until(shim, f"B {seq} ")
    assert counted(messages) == 11, messages
    assert shim.process.poll() is None
    # A connection the core hands over before it reads the counts is served, then given back.
    late, late_client, late_seq = hand(shim, get("/app/pid"), slot=1)
    assert late_client.read().status == 200
    late_messages = reports_until(shim, f"B {late_seq} ")
    assert late_messages[-1].startswith(f"B {late_seq} ") and counted(late_messages) == 1
    assert shim.process.poll() is None
    shim.control.shutdown(socket.SHUT_WR)
    assert shim.process.wait(TIMEOUT) == 0
    for conn, conn_client in ((connection, client), (late, late_client)):
        conn_client.send(get("/conformance?after"))
        assert_the_cores_again(conn, conn_client, get("/conformance?after"))


def test_client_gone_mid_body_is_reported_x(spawn: Any) -> None:
    shim = spawn()
    head = get("/conformance", "Content-Length: 100000", method="POST")
    connection, client, seq = hand(shim, head + b"x" * 1000)
    connection.reset_by_client()
    assert closed_report(shim, seq, []) == 0
    assert shim.slot(0)[1] == 0
    # The process serves on.
    other, other_client, _ = hand(shim, get("/conformance"), slot=1)
    assert other_client.read().status == 200


def test_protocol_error_in_a_c_message_is_answered_x(spawn: Any) -> None:
    shim = spawn()
    connection = shim.connect()
    socket.send_fds(shim.control, [b"C 77 0 - nonsense\n"], [connection.server.fileno()])
    assert shim.wait_report("X 77 ") == "X 77 0"
    assert "protocol error" in shim.log()
    # Its descriptor was let go: the client sees the connection end only when the core closes.
    shim.seq = 77
    other, other_client, _ = hand(shim, get("/conformance"), slot=1)
    assert other_client.read().status == 200


# Giving connections back: a slow request, stopping


def test_a_slow_request_gives_back_the_idle_connections(spawn: Any) -> None:
    shim = spawn()
    slow, slow_client, slow_seq = hand(shim, get("/conformance?a"), slot=0)
    assert slow_client.read().status == 200
    idle, idle_client, idle_seq = hand(shim, get("/conformance?b"), slot=1)
    assert idle_client.read().status == 200
    started = time.monotonic()
    slow_client.send(get("/app/sleep?0.4"))
    messages = reports_until(shim, "S")
    busy_after = time.monotonic() - started
    assert messages == ["S"], messages
    assert busy_after >= BUSY_AFTER * 0.9
    # The idle connection goes back; the busy one stays.
    messages = reports_until(shim, "B ")
    assert len(messages) == 1, messages
    assert given_back(messages) == {idle_seq: b""}, messages
    assert shim.slot(1)[1] == 0
    # Its client's next request is the core's to read now.
    probe = get("/conformance?probe")
    idle_client.send(probe)
    assert slow_client.read().body == str(shim.process.pid).encode()
    messages += reports_until(shim, "R")
    assert messages[-1] == "R"
    assert time.monotonic() - started >= 0.4
    assert_the_cores_again(idle, idle_client, probe)
    # The busy connection is still the shim's, and served as before.
    slow_client.send(get("/conformance?again"))
    assert slow_client.read().json()["query"] == "again"
    slow.client.shutdown(socket.SHUT_WR)
    assert slow_client.at_eof()
    messages += reports_until(shim, f"X {slow_seq} ")
    assert idle_seq not in closed(messages)
    assert counted(messages) == 4, messages


def test_bytes_read_and_not_served_go_back_with_b(spawn: Any) -> None:
    shim = spawn()
    slow, slow_client, _ = hand(shim, get("/conformance?a"), slot=0)
    assert slow_client.read().status == 200
    # The core read a request and the start of the next one's head.
    partial = b"GET /conformance?next HTTP/1.1\r\nHo"
    idle, idle_client, idle_seq = hand(shim, get("/conformance?b") + partial, slot=1)
    assert idle_client.read().status == 200
    slow_client.send(get("/app/sleep?0.3"))
    messages = reports_until(shim, "B ")
    assert given_back(messages) == {idle_seq: partial}, messages
    idle_client.send(b"st: example.test\r\n\r\n")
    assert slow_client.read().status == 200
    assert_the_cores_again(idle, idle_client, b"st: example.test\r\n\r\n")


@pytest.mark.parametrize("how", ["eof", "sigterm"])
def test_stop_gives_back_idle_connections(spawn: Any, how: str) -> None:
    shim = spawn()
    held = [hand(shim, get(f"/conformance?c={i}"), slot=i) for i in range(3)]
    for _, client, _ in held:
        assert client.read().status == 200
    stop(shim, how)
    messages = reports_until_exit(shim)
    assert given_back(messages) == {seq: b"" for _, _, seq in held}, messages
    assert closed(messages) == set(), messages
    assert counted(messages) == 3, messages
    assert shim.process.wait(TIMEOUT) == 0
    for i, (connection, client, _) in enumerate(held):
        assert shim.slot(i)[1] == 0
        client.send(get("/conformance?after"))
        assert_the_cores_again(connection, client, get("/conformance?after"))


@pytest.mark.parametrize("how", ["eof", "sigterm"])
@pytest.mark.parametrize("behind", ["nothing", "pipelined"])
def test_stop_gives_back_the_busy_connection_after_its_response(
    spawn: Any, how: str, behind: str
) -> None:
    shim = spawn()
    idle, idle_client, idle_seq = hand(shim, get("/conformance"), slot=0)
    assert idle_client.read().status == 200
    # A request pipelined behind the busy one is read, but not served by a stopping process: it
    # goes back to the core with the connection.
    pipelined = get("/conformance?pipelined") if behind == "pipelined" else b""
    busy, busy_client, busy_seq = hand(shim, get("/app/sleep?0.5") + pipelined, slot=1)
    time.sleep(0.15)
    stop(shim, how)
    response = busy_client.read()
    assert response.status == 200
    assert response.body == str(shim.process.pid).encode()
    assert response.header("connection") is None
    messages = reports_until_exit(shim)
    # The idle one went back when the request turned slow or at the stop, the busy one after it.
    assert given_back(messages) == {idle_seq: b"", busy_seq: pipelined}, messages
    assert closed(messages) == set(), messages
    assert counted(messages) == 2, messages
    assert shim.process.wait(TIMEOUT) == 0
    assert shim.slot(1)[1] == 0
    for connection, client in ((idle, idle_client), (busy, busy_client)):
        client.send(get("/conformance?after"))
        assert_the_cores_again(connection, client, get("/conformance?after"))


def test_stop_closes_a_busy_connection_that_may_not_stay_open(spawn: Any) -> None:
    shim = spawn()
    busy, busy_client, busy_seq = hand(shim, get("/app/sleep?0.3", "Connection: close"))
    time.sleep(0.15)
    shim.control.shutdown(socket.SHUT_WR)
    response = busy_client.read()
    assert response.status == 200
    assert response.header("connection") == "close"
    assert busy_client.at_eof()
    messages = reports_until_exit(shim)
    assert f"X {busy_seq} 1" in messages
    assert given_back(messages) == {}, messages
    assert shim.process.wait(TIMEOUT) == 0


def stop(shim: Shim, how: str) -> None:
    """Stops the shim as the core does: EOF on the control channel, or SIGTERM."""
    if how == "eof":
        shim.control.shutdown(socket.SHUT_WR)
    else:
        shim.process.send_signal(signal.SIGTERM)
