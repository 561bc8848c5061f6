"""HTTP/1.1 behaviour of the front: keep-alive, pipelining, HEAD, 100-continue, large bodies."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

from conftest import APPS, HttpReader, connect, request


def test_keep_alive_reuses_the_connection(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    with connect(server.port) as sock:
        reader = HttpReader(sock)
        for i in range(20):
            sock.sendall(f"GET /n{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            resp = reader.read()
            assert resp.status == 200
            assert json.loads(resp.body)["PATH_INFO"] == f"/n{i}"


def test_pipelined_requests_answered_in_order(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--min-instances", "2")
    raw = (
        b"".join(f"GET /p{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for i in range(10))
        + b"POST /last HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nbody"
    )
    with connect(server.port) as sock:
        sock.sendall(raw)
        reader = HttpReader(sock)
        paths = [json.loads(reader.read().body)["PATH_INFO"] for _ in range(11)]
    assert paths == [f"/p{i}" for i in range(10)] + ["/last"]


def test_pipelined_request_after_a_core_error_is_not_served(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    with connect(server.port) as sock:
        sock.sendall(b"BROKEN\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
        reader = HttpReader(sock)
        assert reader.read().status == 400
        assert sock.recv(100) == b""  # closed: nothing after a malformed request is trusted


def test_head_has_headers_but_no_body(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    with connect(server.port) as sock:
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\nGET /after HTTP/1.1\r\nHost: t\r\n\r\n")
        reader = HttpReader(sock)
        head = reader.read(head_only=True)
        assert head.status == 200
        assert int(head.header("Content-Length") or 0) > 0
        # The next response must follow directly: a HEAD body would corrupt the stream.
        after = reader.read()
        assert json.loads(after.body)["PATH_INFO"] == "/after"


def test_expect_100_continue(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    with connect(server.port) as sock:
        sock.sendall(
            b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = sock.recv(100)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"12345")
        resp = HttpReader(sock).read()
        assert json.loads(resp.body)["body"] == "12345"


def test_chunked_upload_of_10_mb_arrives_intact(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    body = os.urandom(10 * 1024 * 1024)
    with connect(server.port, timeout=60) as sock:
        sock.sendall(b"POST /big HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(body), 300_000):
            chunk = body[i : i + 300_000]
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        resp = HttpReader(sock).read()
    environ = json.loads(resp.body)
    assert environ["CONTENT_LENGTH"] == str(len(body))
    assert environ["body"].encode("latin-1") == body


def test_content_length_upload_of_10_mb(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    body = os.urandom(10 * 1024 * 1024)
    raw = b"PUT /big HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    resp = request(server.port, raw, timeout=60)
    environ = json.loads(resp.body)
    assert (
        hashlib.sha256(environ["body"].encode("latin-1")).digest() == hashlib.sha256(body).digest()
    )


def test_header_section_over_8_kib_is_431(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    raw = b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n"
    resp = request(server.port, raw)
    assert resp.status == 431


def test_refused_requests_never_reach_the_app(server_factory, tmp_path: Path) -> None:
    server = server_factory(APPS / "wsgi_echo")
    for raw in (
        b"NOT HTTP\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    ):
        assert request(server.port, raw).status in (400, 501)
    # The app process served nothing: its first request now is number one.
    time.sleep(0.1)
    assert "refused a request with 400" in server.log()
    assert "refused a request with 501" in server.log()


def test_client_that_disconnects_mid_body_does_not_disturb_others(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    sock = connect(server.port)
    sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\npartial")
    sock.close()
    resp = request(server.port, b"GET /ok HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert resp.status == 200


def test_http10_keep_alive(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    with connect(server.port) as sock:
        reader = HttpReader(sock)
        for _ in range(3):
            sock.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            resp = reader.read()
            assert resp.status == 200
            assert (
                resp.header(
                    "Connection",
                ).lower()
                == "keep-alive"
            )


def test_connection_close_is_honoured(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    with connect(server.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        reader = HttpReader(sock)
        assert reader.read().status == 200
        assert sock.recv(10) == b""


def test_unix_socket_and_tcp_share_processes(server_factory, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server = server_factory(APPS / "wsgi_echo", "--socket", str(path))
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"GET /app/pid HTTP/1.1\r\nHost: t\r\n\r\n")
        pid_unix = HttpReader(s).read().body
    pid_tcp = request(
        server.port, b"GET /app/pid HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    ).body
    assert pid_unix == pid_tcp
