"""Whole connections for the Ruby shim (docs/protocol/handoff.md, "Whole connections (ASGI,
Rack)" and "One request at a time: giving connections back"): what is the Rack server's own, one
request at a time, with the shim's ``S``, ``B``, ``R`` messages giving connections back. What
every shim does on a connection is tested in test_shim_connections.py, driven the same way: the
test plays the core, hands the shim loopback TCP connections with ``C`` and the bytes "already
read", then talks HTTP on the client's end while reading the shim's messages. Requests go to
``tests/apps/echo_rack``.

The test keeps its own copy of every connection it hands over, as the core does: after ``B`` the
connection must still work through that copy, unread and not shut down by the shim.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from python_shim import (
    TIMEOUT,
    assert_refused_after_a_good_request,
    assert_the_cores_again,
    closed,
    counted,
    get,
    given_back,
    hand,
    reports_until,
    reports_until_exit,
    spawning,
    stop,
)
from test_ruby_shim_protocol import (
    RUBY,
    start_rack_echo,
)

pytestmark = pytest.mark.skipif(RUBY is None, reason="no ruby interpreter on PATH")

# How long a request runs before the shim says it is busy (S).
BUSY_AFTER = 0.05


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """``spawn(**spawn_fields)``: a shim on the Rack echo app that answered READY."""
    yield from spawning(tmp_path, start_rack_echo)


# The env, what the core would refuse


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


def test_a_bad_chunk_size_is_refused_before_the_app_is_called(spawn: Any) -> None:
    """A Rack app gets a whole body: a chunked one that turns out malformed is refused as the
    core would (an ASGI app, called at the head, is already running by then)."""
    bad_chunk = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    assert_refused_after_a_good_request(spawn(), bad_chunk, 400)


# Counting requests, giving connections back at the request ceiling


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


def test_a_connection_sent_while_a_request_runs_goes_back_with_its_request(spawn: Any) -> None:
    """Its client would wait behind the running request: the shim says S at once (not after
    BUSY_AFTER) and gives the new connection back with the request the core had read, untouched,
    so that the core serves it elsewhere (or starts a process for it)."""
    shim = spawn()
    slow, slow_client, _ = hand(shim, get("/app/sleep?0.5"), slot=0)
    time.sleep(0.02)
    started = time.monotonic()
    first = get("/conformance?new") + get("/conformance?pipelined")
    new, new_client, new_seq = hand(shim, first, slot=1)
    messages = reports_until(shim, f"B {new_seq} ")
    assert time.monotonic() - started < 0.3, messages
    assert messages[0] == "S", messages
    assert given_back(messages) == {new_seq: first}, messages
    assert counted(messages) == 0, messages
    assert shim.slot(1)[1] == 0
    assert slow_client.read().status == 200
    assert reports_until(shim, "R") == ["R"]
    # Nothing of it was answered, and the connection is the core's to read now.
    probe = get("/conformance?probe")
    new_client.send(probe)
    assert_the_cores_again(new, new_client, probe)


def test_requests_waiting_their_turn_go_back_as_the_client_sent_them(spawn: Any) -> None:
    """Two connections handed over back to back to a shim already serving connections: while
    the first's request runs long, the second's waits whole (head and body parsed, or its C
    unread); it goes back as the client sent it."""
    shim = spawn()
    held, held_client, held_seq = hand(shim, get("/conformance?held"), slot=2)
    assert held_client.read().status == 200
    body = b"x" * 1000
    waiting_request = get("/conformance", f"Content-Length: {len(body)}", method="POST") + body
    first, first_client, _ = hand(shim, get("/app/sleep?0.4"), slot=0)
    second, second_client, second_seq = hand(shim, waiting_request, slot=1)
    messages = reports_until(shim, f"B {second_seq} ")
    # The connection idle between requests goes back too.
    assert given_back(messages) == {held_seq: b"", second_seq: waiting_request}, messages
    assert first_client.read().status == 200
    probe = get("/conformance?probe")
    second_client.send(probe)
    assert_the_cores_again(second, second_client, probe)


def test_a_half_closed_client_still_gets_its_pipelined_answers(spawn: Any) -> None:
    shim = spawn()
    connection, client, seq = hand(shim, get("/conformance?a"))
    assert client.read().status == 200
    client.send(get("/conformance?b") + get("/conformance?c"))
    connection.client.shutdown(socket.SHUT_WR)
    assert [client.read().json()["query"] for _ in range(2)] == ["b", "c"]
    assert client.at_eof()
    assert counted(reports_until(shim, f"X {seq} ")) == 3


@pytest.mark.parametrize("how", ["eof", "sigterm"])
def test_stop_gives_back_a_request_pipelined_behind_the_busy_one(spawn: Any, how: str) -> None:
    """Read, parsed only when its turn comes, and so not served by a stopping process: it goes
    back to the core with the connection. (The Python shim has parsed it by then, and closes.)"""
    shim = spawn()
    idle, idle_client, idle_seq = hand(shim, get("/conformance"), slot=0)
    assert idle_client.read().status == 200
    # A request pipelined behind the busy one is read, but not served by a stopping process: it
    # goes back to the core with the connection.
    pipelined = get("/conformance?pipelined")
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
