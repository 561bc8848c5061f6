"""One conformance suite for every language, through the real core.

Each language has an echo app (``tests/apps/``) that answers ``/conformance`` with the same JSON:
method, path, query, headers (lowercase names, repeated ones joined with ", "), body length and
SHA-256. Every test here runs once per language: Python WSGI, Python ASGI (with httptools, and with
the shim's pure-Python HTTP parser), Ruby (Rack), Node and a generic app behind the proxy. In CI
every runtime is installed and nothing is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import APPS, HttpReader, Server, connect, request, start_server  # noqa: E402

LANGUAGES = {
    "wsgi": (APPS / "wsgi_echo", ()),
    "asgi": (APPS / "echo_asgi", ()),
    # The ASGI server's own parser, as when the app's Python lacks httptools.
    "asgi-pure-parser": (
        APPS / "echo_asgi",
        ("--env-var", "APPMANAGER_PYTHON_HTTP_PARSER=python"),
    ),
    "ruby": (APPS / "echo_rack", ()),
    "node": (APPS / "echo_node", ()),
    "generic": (APPS / "generic_app", ("--app-start-command", "python3 server.py")),
}


@pytest.fixture(scope="module", params=list(LANGUAGES))
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    app, args = LANGUAGES[request.param]
    srv = start_server(
        app, "--min-instances", "2", *args, tmp_path=tmp_path_factory.mktemp(request.param)
    )
    yield srv
    srv.stop()
    assert srv.proc.stdout is not None
    srv.proc.stdout.close()


def echo(port: int, raw: bytes) -> dict[str, object]:
    resp = request(port, raw, timeout=60)
    assert resp.status == 200, resp.body[:300]
    return json.loads(resp.body)


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_methods(server: Server, method: str) -> None:
    body = b"" if method in ("GET", "DELETE", "OPTIONS") else b"payload"
    raw = (
        f"{method} /conformance HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    data = echo(server.port, raw)
    assert data["method"] == method
    assert data["body_len"] == len(body)


def test_query_string(server: Server) -> None:
    raw = (
        b"GET /conformance?a=1&b=%20x&c=caf%C3%A9 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    data = echo(server.port, raw)
    assert data["path"] == "/conformance"
    assert data["query"] == "a=1&b=%20x&c=caf%C3%A9"


def test_repeated_headers_are_joined(server: Server) -> None:
    raw = (
        b"GET /conformance HTTP/1.1\r\nHost: t\r\nX-Multi: one\r\nX-Multi: two\r\n"
        b"X-Single: alone\r\nConnection: close\r\n\r\n"
    )
    headers = echo(server.port, raw)["headers"]
    assert isinstance(headers, dict)
    assert headers["x-multi"] == "one, two"
    assert headers["x-single"] == "alone"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_10_mb_upload_arrives_intact(server: Server, chunked: bool) -> None:
    body = os.urandom(10 * 1024 * 1024)
    if chunked:
        framing = b"Transfer-Encoding: chunked\r\n"
        payload = (
            b"".join(
                b"%x\r\n" % len(body[i : i + 1_000_000]) + body[i : i + 1_000_000] + b"\r\n"
                for i in range(0, len(body), 1_000_000)
            )
            + b"0\r\n\r\n"
        )
    else:
        framing = b"Content-Length: %d\r\n" % len(body)
        payload = body
    raw = b"POST /conformance HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + framing + b"\r\n"
    data = echo(server.port, raw + payload)
    assert data["body_len"] == len(body)
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_streamed_response(server: Server) -> None:
    resp = request(server.port, b"GET /app/stream HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert resp.status == 200
    assert resp.body == b"line 0\nline 1\nline 2\n"
    assert resp.header("Transfer-Encoding") == "chunked"


def test_keep_alive(server: Server) -> None:
    with connect(server.port) as sock:
        reader = HttpReader(sock)
        for i in range(10):
            sock.sendall(f"GET /conformance?n={i} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            resp = reader.read()
            assert json.loads(resp.body)["query"] == f"n={i}"


def test_pipelining(server: Server) -> None:
    raw = b"".join(f"GET /conformance?n={i} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for i in range(8))
    with connect(server.port) as sock:
        sock.sendall(raw)
        reader = HttpReader(sock)
        queries = [json.loads(reader.read().body)["query"] for _ in range(8)]
    assert queries == [f"n={i}" for i in range(8)]


def test_head(server: Server) -> None:
    with connect(server.port) as sock:
        sock.sendall(
            b"HEAD /conformance HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /conformance?after HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        reader = HttpReader(sock)
        head = reader.read(head_only=True)
        assert head.status == 200
        # Had the HEAD response carried a body, this would not parse as the next response.
        assert json.loads(reader.read().body)["query"] == "after"


def test_exception_in_the_app_is_500(server: Server) -> None:
    resp = request(server.port, b"GET /app/raise HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert resp.status == 500
    ok = request(server.port, b"GET /conformance HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert ok.status == 200


def test_crash_is_502_and_a_fresh_process_follows(server: Server) -> None:
    pids_before = {p.pid for p in server.app_processes()}
    resp = request(server.port, b"GET /app/crash HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert resp.status == 502
    server.wait_for_log("exited with status 7")
    for _ in range(4):
        ok = request(
            server.port, b"GET /conformance HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        assert ok.status == 200
    assert {p.pid for p in server.app_processes()} != pids_before
