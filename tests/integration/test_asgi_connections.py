"""ASGI apps take whole connections through the core (handoff.md, "Whole connections"): many
requests on one connection, pipelined or not, balanced per connection; a crash answers 502 where
a request had arrived; max_requests, max_request_time and the access log work on requests the core
never sees."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

from conftest import APPS, HttpReader, connect, get
from test_access_log import read_lines

ECHO = APPS / "echo_asgi"


def ask(sock: socket.socket, reader: HttpReader, path: str) -> tuple[int, bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    response = reader.read()
    return response.status, response.body


def test_keep_alive_and_pipelining_on_one_connection(server_factory) -> None:
    server = server_factory(ECHO, "--min-instances", "2")
    with connect(server.port) as sock:
        reader = HttpReader(sock)
        pids = {ask(sock, reader, "/app/pid")[1] for _ in range(200)}
        sock.sendall(
            b"".join(b"GET /conformance?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(50))
        )
        queries = [json.loads(reader.read().body)["query"] for _ in range(50)]
    assert queries == [f"n={i}" for i in range(50)]
    # One connection, one process: it is balanced as a whole.
    assert len(pids) == 1


def test_connections_are_balanced_to_the_process_with_fewest(server_factory) -> None:
    server = server_factory(ECHO, "--min-instances", "2", "--max-pool-size", "2")
    first, second = connect(server.port), connect(server.port)
    with first, second:
        one = ask(first, HttpReader(first), "/app/pid")[1]
        two = ask(second, HttpReader(second), "/app/pid")[1]
        assert one != two
        first.close()
        time.sleep(0.3)  # the process reports the connection closed
        with connect(server.port) as third:
            assert ask(third, HttpReader(third), "/app/pid")[1] == one


def test_the_first_request_before_any_process_is_ready(server_factory) -> None:
    """Before a process has said it takes connections, a request is handed over alone (Q); the
    connection's next request goes over whole."""
    server = server_factory(ECHO, "--min-instances", "0")
    with connect(server.port, timeout=30) as sock:
        reader = HttpReader(sock)
        status, pid = ask(sock, reader, "/app/pid")
        assert status == 200
        for _ in range(5):
            assert ask(sock, reader, "/app/pid") == (200, pid)


def test_crash_with_a_request_in_flight_is_502_and_idle_connections_close(server_factory) -> None:
    server = server_factory(ECHO, "--max-pool-size", "1")
    idle = connect(server.port)
    with idle, connect(server.port) as sock:
        idle_reader = HttpReader(idle)
        pid = ask(idle, idle_reader, "/app/pid")[1]
        reader = HttpReader(sock)
        assert ask(sock, reader, "/app/pid") == (200, pid)
        # The second request on the connection crashes the process before it answers.
        assert ask(sock, reader, "/app/crash")[0] == 502
        assert idle.recv(100) == b""  # idle between requests: closed, no 502
    server.wait_for_log("exited with status 7")
    assert get(server.port, "/app/pid").body != pid


def test_max_requests_counts_requests_on_connections(server_factory) -> None:
    server = server_factory(ECHO, "--max-requests", "20", "--max-pool-size", "1")
    pids: list[bytes] = []
    served = 0
    deadline = time.monotonic() + 30
    while served < 70 and time.monotonic() < deadline:
        with connect(server.port) as sock:
            reader = HttpReader(sock)
            while served < 70:
                try:
                    status, pid = ask(sock, reader, "/app/pid")
                except (ConnectionError, OSError):
                    break  # the retired process closed the connection between requests
                assert status == 200
                pids.append(pid)
                served += 1
    log = server.log()
    retired = re.findall(r"process (\d+) retired: served (\d+) requests \(max_requests\)", log)
    assert len(retired) >= 2
    for _, count in retired:
        assert 20 <= int(count) <= 25  # the limit, its stagger, and what was in flight
    assert len(set(pids)) >= 3


def test_max_request_time_answers_504_on_a_connection(server_factory) -> None:
    server = server_factory(ECHO, "--max-request-time", "1")
    with connect(server.port) as sock:
        reader = HttpReader(sock)
        status, old = ask(sock, reader, "/app/pid")
        start = time.monotonic()
        assert ask(sock, reader, "/app/sleep?30")[0] == 504
        assert time.monotonic() - start < 5
    log = server.wait_for_log(f"process {old.decode()} exited with signal 9")
    assert "a request took longer than 1 s (max_request_time)" in log
    assert get(server.port, "/app/pid").body != old


def test_every_request_on_a_connection_is_in_the_access_log(server_factory, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    server = server_factory(ECHO, "--access-log", str(log))
    with connect(server.port) as sock:
        reader = HttpReader(sock)
        for i in range(3):
            assert ask(sock, reader, f"/conformance?n={i}")[0] == 200
        sock.sendall(b"GET /app/status?404 HTTP/1.1\r\nHost: t\r\nUser-Agent: ua/2\r\n\r\n")
        assert reader.read().status == 404
    lines = read_lines(log, 4)
    assert [line["request"] for line in lines] == [
        "GET /conformance?n=0 HTTP/1.1",
        "GET /conformance?n=1 HTTP/1.1",
        "GET /conformance?n=2 HTTP/1.1",
        "GET /app/status?404 HTTP/1.1",
    ]
    assert all(line["remote"] == "127.0.0.1" for line in lines)
    assert lines[3]["status"] == "404" and lines[3]["agent"] == "ua/2"


def test_max_pool_size_one_keeps_serving_many_connections(server_factory) -> None:
    server = server_factory(ECHO, "--max-pool-size", "1")
    sockets = [connect(server.port) for _ in range(20)]
    try:
        readers = [HttpReader(sock) for sock in sockets]
        for sock, reader in zip(sockets, readers, strict=True):
            assert ask(sock, reader, "/conformance")[0] == 200
        for sock, reader in zip(sockets, readers, strict=True):
            assert ask(sock, reader, "/conformance")[0] == 200
    finally:
        for sock in sockets:
            sock.close()


def test_beside_other_apps_each_request_reaches_its_own(server_factory, tmp_path: Path) -> None:
    """Routed by path beside another app, an ASGI app gets its requests one at a time: a
    connection's next request may be the other app's."""
    conf = tmp_path / "appmanager.toml"
    conf.write_text(
        f'[[app]]\nroot = "{APPS / "wsgi_echo"}"\n\n[[app]]\nroot = "{ECHO}"\nbase_uri = "/asgi"\n'
    )
    server = server_factory(None, "--config", str(conf))
    with connect(server.port) as sock:
        reader = HttpReader(sock)
        for _ in range(3):
            status, body = ask(sock, reader, "/asgi/echo")
            assert status == 200 and json.loads(body)["root_path"] == "/asgi"
            status, body = ask(sock, reader, "/wsgi")
            assert status == 200 and json.loads(body)["PATH_INFO"] == "/wsgi"


def test_websocket_after_a_request_on_the_same_connection(server_factory) -> None:
    server = server_factory(ECHO)
    with connect(server.port) as sock:
        reader = HttpReader(sock)
        assert ask(sock, reader, "/app/pid")[0] == 200
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert reader.read(head_only=True).status == 101
        mask = b"\x01\x02\x03\x04"
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"hello"))
        sock.sendall(b"\x81\x85" + mask + payload)
        frame = reader.buf
        while len(frame) < 7:
            frame += sock.recv(100)
        assert frame[:7] == b"\x81\x05hello"


def test_memory_limit_retires_a_process_that_holds_connections(server_factory) -> None:
    server = server_factory(ECHO, "--memory-limit", "60", "--max-pool-size", "2")
    with connect(server.port) as sock:
        reader = HttpReader(sock)
        status, first = ask(sock, reader, "/app/grow?100")
        assert status == 200
        server.wait_for_log(f"process {first.decode()} retired: private memory", timeout=15)
        # Idle between requests, the connection is closed by the retiring process.
        assert sock.recv(100) == b""
    server.wait_for_log(f"process {first.decode()} exited")
    assert get(server.port, "/app/pid").body != first
