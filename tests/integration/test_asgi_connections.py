"""ASGI apps take whole connections through the core (handoff.md, "Whole connections"): what is
ASGI's own. The first request before any process is ready, many connections on one process, an
app routed beside others, a WebSocket after a request, memory_limit; what Rack apps do on
connections too is tested in test_whole_connections.py."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import APPS, HttpReader, connect, get
from test_whole_connections import ask

ECHO = APPS / "echo_asgi"


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
        server.wait_for_log(f"process {first.decode()} exited")
        # Idle between requests, the connection went back to the core, not closed: its next
        # request is another process's.
        status, second = ask(sock, reader, "/app/pid")
        assert status == 200 and second != first
    assert get(server.port, "/app/pid").body != first
