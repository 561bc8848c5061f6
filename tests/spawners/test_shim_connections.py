"""Whole connections (docs/protocol/handoff.md, "Whole connections"), as every shim that takes
them must serve them: the Python shim's ASGI server on ``tests/apps/echo_asgi``, with httptools
parsing the requests and with its pure-Python parser (``APPMANAGER_PYTHON_HTTP_PARSER=python``),
and the Ruby shim's Rack server on ``tests/apps/echo_rack``. Each test runs on all three.

Driven over the real protocol: the test plays the core, hands the shim loopback TCP connections
with ``C`` and the bytes "already read", then talks HTTP on the client's end while reading the
shim's ``X``, ``N`` and ``L`` reports. What only one language does (the ASGI scope, lifespan and
WebSocket; the Rack env, and giving connections back with ``S``, ``B``, ``R``) is tested in
test_python_shim_connections.py and test_ruby_shim_connections.py.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from python_shim import (
    PARSERS,
    TIMEOUT,
    assert_refused_after_a_good_request,
    assert_the_cores_again,
    closed,
    closed_report,
    counted,
    get,
    given_back,
    hand,
    reports_until,
    reports_until_exit,
    spawning,
    spawning_asgi_echo,
    stop,
    wait_slot,
)
from test_ruby_shim_protocol import RUBY, start_rack_echo

SHIMS = [f"python-{parser}" for parser in PARSERS] + ["ruby"]


@pytest.fixture(params=SHIMS)
def shim_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def spawn(shim_name: str, tmp_path: Path) -> Iterator[Any]:
    """``spawn(**spawn_fields)``: a shim of the language under test on its echo app, that
    answered READY."""
    if shim_name == "ruby":
        if RUBY is None:
            pytest.skip("no ruby interpreter on PATH")
        yield from spawning(tmp_path, start_rack_echo)
    else:
        yield from spawning_asgi_echo(tmp_path, shim_name.removeprefix("python-"))


def app_is_called_at_the_head(shim_name: str) -> bool:
    """Whether the app is called once a request's head is in and receives its body as it comes
    (ASGI), rather than once the whole body is read (Rack)."""
    return shim_name.startswith("python")


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


def test_expect_100_continue_is_answered_before_the_body_is_read(spawn: Any) -> None:
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
        "gzip",
        "too-large",
        "1-gib-and-a-byte",
        "expect",
        "big-head",
    ],
)
def test_refused_after_a_good_request(spawn: Any, request_bytes: bytes, status: int) -> None:
    assert_refused_after_a_good_request(spawn(), request_bytes, status)


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


def test_client_gone_mid_body_is_reported_x(spawn: Any, shim_name: str) -> None:
    shim = spawn()
    head = get("/conformance", "Content-Length: 100000", method="POST")
    connection, client, seq = hand(shim, head + b"x" * 1000)
    connection.reset_by_client()
    # Counted if the app began the request (its 500 page ends it): an ASGI app is called at the
    # head and receives the body as it comes, a Rack app only once the whole body is in.
    assert closed_report(shim, seq, []) == (1 if app_is_called_at_the_head(shim_name) else 0)
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


# Stopping: connections go back to the core


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
def test_stop_gives_back_the_busy_connection_after_its_response(spawn: Any, how: str) -> None:
    shim = spawn()
    idle, idle_client, idle_seq = hand(shim, get("/conformance"), slot=0)
    assert idle_client.read().status == 200
    busy, busy_client, busy_seq = hand(shim, get("/app/sleep?0.5"), slot=1)
    time.sleep(0.15)
    stop(shim, how)
    response = busy_client.read()
    assert response.status == 200
    assert response.header("connection") is None
    messages = reports_until_exit(shim)
    # The idle one went back at the stop (or when the request turned slow), the busy one after it.
    assert given_back(messages) == {idle_seq: b"", busy_seq: b""}, messages
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
