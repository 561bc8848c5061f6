"""Rack apps take whole connections through the core (handoff.md, "Whole connections" and "One
request at a time: giving connections back"): what is Rack's own. A slow request does not hold up
the other clients of its process, whose idle connections are given back (``B``) and rerouted, and
survive a crash; a rolling restart gives the keep-alive connections back instead of closing them;
an app routed beside others; Sinatra on a connection. What ASGI apps do on connections too is
tested in test_whole_connections.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

from conftest import APPS, HttpReader, connect
from test_whole_connections import Held, ask, hold, wait_until_ready

ECHO = APPS / "echo_rack"
SINATRA = APPS / "sinatra_app"


def test_a_slow_request_does_not_hold_up_the_other_clients_of_its_process(server_factory) -> None:
    server = server_factory(ECHO, "--min-instances", "2", "--max-pool-size", "2")
    wait_until_ready(server, 2)
    held = [hold(server.port) for _ in range(6)]
    try:
        by_pid: dict[bytes, list[Held]] = {}
        for conn in held:
            by_pid.setdefault(conn.pid, []).append(conn)
        assert len(by_pid) == 2, f"connections not spread: {[c.pid for c in held]}"
        busy_pid, other_pid = list(by_pid)
        assert len(by_pid[busy_pid]) >= 2, f"connections not spread: {[c.pid for c in held]}"
        slow, *neighbours = by_pid[busy_pid]

        slow.sock.sendall(b"GET /app/sleep?1 HTTP/1.1\r\nHost: t\r\n\r\n")
        began = time.monotonic()
        time.sleep(0.2)  # the shim says busy (S) after 50 ms and gives back its idle connections
        for conn in neighbours:
            start = time.monotonic()
            status, pid = conn.ask("/app/pid")
            elapsed = time.monotonic() - start
            assert status == 200
            assert elapsed < 0.5, f"a neighbour of the slow request waited {elapsed:.2f} s"
            assert pid == other_pid, "a given-back connection must go to the free process"
        for conn in by_pid[other_pid]:
            start = time.monotonic()
            assert conn.ask("/app/pid") == (200, other_pid)
            assert time.monotonic() - start < 0.5
        # A new connection goes to the process that is not busy, although it holds more.
        start = time.monotonic()
        fresh = hold(server.port)
        with fresh.sock:
            assert time.monotonic() - start < 0.5
            assert fresh.pid == other_pid
        assert time.monotonic() - began < 1.0, "the checks above must run inside the slow request"

        response = slow.reader.read()
        assert response.status == 200 and response.body == busy_pid
        assert time.monotonic() - began >= 0.95
        # The slow request's connection stays with its process, and the process serves again.
        assert slow.ask("/app/pid") == (200, busy_pid)
        for conn in neighbours:
            assert conn.ask("/app/pid")[0] == 200
    finally:
        for conn in held:
            conn.sock.close()


def test_a_burst_of_slow_requests_grows_the_pool(server_factory) -> None:
    """8 clients at once, each on a new connection, with a 0.5 s request, against 1 process: the
    connections the busy process cannot serve go back to the core, which starts processes for
    them, instead of queueing 4 s behind one another in the first process."""
    server = server_factory(ECHO, "--min-instances", "1", "--max-pool-size", "8")
    wait_until_ready(server, 1)
    answers: list[tuple[float, bytes]] = []
    began = time.monotonic()

    def client() -> None:
        with connect(server.port, timeout=30) as sock:
            status, pid = ask(sock, HttpReader(sock), "/app/sleep?0.5")
            assert status == 200
            answers.append((time.monotonic() - began, pid))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 8
    assert max(t for t, _ in answers) < 2.5, answers
    assert len({pid for _, pid in answers}) >= 4, answers


def test_more_clients_than_processes_can_serve_grow_the_pool(server_factory) -> None:
    """6 keep-alive clients, each sending 30 ms requests one after another, against 1 process
    that can serve about 33 a second: requests wait their turn in the process, which says it is
    busy and gives their connections back, so that the core sees the queue and grows the pool."""
    server = server_factory(ECHO, "--min-instances", "1", "--max-pool-size", "4")
    wait_until_ready(server, 1)
    served: list[bytes] = []
    stop_at = time.monotonic() + 2.0

    def client() -> None:
        with connect(server.port, timeout=30) as sock:
            reader = HttpReader(sock)
            while time.monotonic() < stop_at:
                status, pid = ask(sock, reader, "/app/sleep?0.03")
                assert status == 200
                served.append(pid)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # One process alone would serve about 66 in 2 s.
    assert len(set(served)) >= 3, f"{len(set(served))} processes"
    assert len(served) > 120, f"{len(served)} requests"


def test_connections_given_back_before_a_crash_survive_it(server_factory) -> None:
    """A request that runs a while makes its process give back its idle connections; when the
    process then crashes, those connections are the core's and their requests go to its
    replacement."""
    server = server_factory(ECHO, "--max-pool-size", "1")
    idle = hold(server.port)
    with idle.sock, connect(server.port) as sock:
        reader = HttpReader(sock)
        assert ask(sock, reader, "/app/pid") == (200, idle.pid)
        sock.sendall(b"GET /app/sleep-crash?0.5 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.2)  # given back by now; its next request waits for a process
        status, pid = idle.ask("/app/pid")
        assert status == 200 and pid != idle.pid
        assert reader.read().status == 502
    server.wait_for_log("exited with status 7")


def test_beside_other_apps_each_request_reaches_its_own(server_factory, tmp_path: Path) -> None:
    """Routed by host beside another app, a Rack app gets its requests one at a time: a
    connection's next request may be the other app's."""
    conf = tmp_path / "appmanager.toml"
    conf.write_text(
        f'[[app]]\nroot = "{APPS / "wsgi_echo"}"\nserver_names = ["wsgi.test"]\n\n'
        f'[[app]]\nroot = "{ECHO}"\nserver_names = ["rack.test"]\n'
    )
    server = server_factory(None, "--config", str(conf))
    with connect(server.port) as sock:
        reader = HttpReader(sock)
        for i in range(3):
            status, body = ask(sock, reader, f"/rack?{i}", host="rack.test")
            env = json.loads(body)
            assert status == 200 and "rack.version" in env
            assert env["PATH_INFO"] == "/rack" and env["HTTP_HOST"] == "rack.test"
            status, body = ask(sock, reader, f"/wsgi?{i}", host="wsgi.test")
            env = json.loads(body)
            assert status == 200 and "rack.version" not in env
            assert env["PATH_INFO"] == "/wsgi" and env["HTTP_HOST"] == "wsgi.test"
        # Pipelined across the two apps, answered in order.
        sock.sendall(
            b"GET /one HTTP/1.1\r\nHost: rack.test\r\n\r\n"
            b"GET /two HTTP/1.1\r\nHost: wsgi.test\r\n\r\n"
            b"GET /three HTTP/1.1\r\nHost: rack.test\r\n\r\n"
        )
        answers = [json.loads(reader.read().body) for _ in range(3)]
        assert [(a["PATH_INFO"], "rack.version" in a) for a in answers] == [
            ("/one", True),
            ("/two", False),
            ("/three", True),
        ]


def read_continue(sock: socket.socket) -> bytes:
    """Read an interim ``100 Continue``; return what followed it in the same read."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(100)
        assert chunk, "closed before 100 Continue"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head == b"HTTP/1.1 100 Continue", head
    return rest


def test_sinatra_on_a_connection(server_factory) -> None:
    server = server_factory(SINATRA, "--min-instances", "2", "--max-pool-size", "2")
    wait_until_ready(server, 2)
    with connect(server.port) as held, connect(server.port) as sock:
        held_pid = ask(held, HttpReader(held), "/pid")[1]
        reader = HttpReader(sock)
        status, pid = ask(sock, reader, "/pid")
        assert status == 200 and pid != held_pid, "the connection goes to the other process"

        assert ask(sock, reader, "/") == (200, b"Hello from Sinatra")
        assert ask(sock, reader, "/hello/rack") == (200, b"Hello, rack!")
        status, body = ask(sock, reader, "/search?q=conn&page=2")
        assert json.loads(body) == {"q": "conn", "page": 2, "script_name": ""}

        data = b'{"langs": ["ruby"], "n": 1}'
        sock.sendall(
            b"POST /json HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
        )
        assert json.loads(reader.read().body) == {
            "received": {"langs": ["ruby"], "n": 1},
            "content_length": str(len(data)),
        }
        # A chunked body, in two chunks.
        sock.sendall(
            b"POST /json HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (10, data[:10])
            + b"%x\r\n%s\r\n" % (len(data) - 10, data[10:])
            + b"0\r\n\r\n"
        )
        assert json.loads(reader.read().body)["received"] == {"langs": ["ruby"], "n": 1}
        # Expect: 100-continue, answered by the process that holds the connection.
        sock.sendall(
            b"POST /form HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 7\r\nExpect: 100-continue\r\n\r\n"
        )
        reader.buf = read_continue(sock)
        sock.sendall(b"name=am")
        assert json.loads(reader.read().body) == {"name": "am", "tags": None}

        # A streamed response (chunked), then the connection goes on.
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        stream = reader.read()
        assert stream.status == 200 and stream.body == b"first;second;third"
        assert "chunked" in (stream.header("Transfer-Encoding") or "").lower()
        assert ask(sock, reader, "/halt") == (403, b"forbidden here")
        assert ask(sock, reader, "/nope") == (404, b"custom not found")
        status, body = ask(sock, reader, "/error")
        assert status == 500 and b"sinatra route failed" in body

        # Pipelined, in order.
        sock.sendall(
            b"GET /hello/a HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /hello/b HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        assert [reader.read().body for _ in range(3)] == [
            b"Hello, a!",
            b"first;second;third",
            b"Hello, b!",
        ]
        # Every request on the connection was served by its process.
        assert ask(sock, reader, "/pid") == (200, pid)
