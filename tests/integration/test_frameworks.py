"""Real Flask and Django apps served by appmanager."""

from __future__ import annotations

import hashlib
import json
import os
import uuid

from conftest import APPS, HttpReader, connect, get, request


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def post(port: int, path: str, body: bytes, content_type: str, chunked: bool = False):
    if chunked:
        framing = b"Transfer-Encoding: chunked\r\n"
        payload = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    else:
        framing = b"Content-Length: %d\r\n" % len(body)
        payload = body
    raw = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n".encode()
        + framing
        + b"Connection: close\r\n\r\n"
        + payload
    )
    return request(port, raw, timeout=60)


def test_flask(server_factory) -> None:
    server = server_factory(APPS / "flask_app", "--startup-file", "app.py")
    assert get(server.port).body == b"Hello from Flask\n"
    resp = post(server.port, "/json", b'{"a": [1, 2]}', "application/json")
    assert json.loads(resp.body) == {"received": {"a": [1, 2]}, "method": "POST"}
    resp = post(server.port, "/form", b"x=1&y=two", "application/x-www-form-urlencoded")
    assert json.loads(resp.body) == {"x": "1", "y": "two"}
    data = os.urandom(3 * 1024 * 1024)
    body, ctype = multipart("file", "blob.bin", data)
    for chunked in (False, True):
        resp = post(server.port, "/upload", body, ctype, chunked=chunked)
        assert json.loads(resp.body) == {
            "name": "blob.bin",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    resp = get(server.port, "/stream")
    assert resp.header("Transfer-Encoding") == "chunked"
    assert resp.body == b"".join(f"part {i}\n".encode() for i in range(5))
    resp = get(server.port, "/error")
    assert resp.status == 500
    assert b"the app failed on purpose" not in resp.body
    assert "the app failed on purpose" in server.wait_for_log("RuntimeError")
    assert get(server.port, "/nope").status == 404
    resp = get(server.port, "/cookie", "Cookie: n=5\r\n")
    assert json.loads(resp.body) == {"seen": "5"}
    cookies = [v for k, v in resp.headers if k.lower() == "set-cookie"]
    assert len(cookies) == 2


def test_flask_keep_alive_session(server_factory) -> None:
    server = server_factory(APPS / "flask_app", "--startup-file", "app.py")
    with connect(server.port) as sock:
        reader = HttpReader(sock)
        for _ in range(5):
            sock.sendall(b"GET /headers HTTP/1.1\r\nHost: h.test\r\nX-Custom: 1\r\n\r\n")
            resp = reader.read()
            assert json.loads(resp.body)["X-Custom"] == "1"


def test_django_project_is_detected_and_served(server_factory) -> None:
    server = server_factory(APPS / "django_project")
    assert "(mysite/wsgi.py)" in server.banner
    assert get(server.port).body == b"Hello from Django\n"
    resp = get(server.port, "/info/?q=search&x=1")
    info = json.loads(resp.body)
    assert info["path"] == "/info/"
    assert info["query"] == {"q": "search", "x": "1"}
    assert info["host"] == "localhost"
    assert info["remote_addr"] == "127.0.0.1"
    assert info["secure"] is False
    resp = post(
        server.port, "/form/", b"name=appmanager&lang=py", "application/x-www-form-urlencoded"
    )
    assert json.loads(resp.body) == {"fields": {"name": "appmanager", "lang": "py"}, "files": []}
    data = os.urandom(2 * 1024 * 1024)
    body, ctype = multipart("file", "f.bin", data)
    resp = post(server.port, "/upload/", body, ctype, chunked=True)
    assert json.loads(resp.body) == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    resp = get(server.port, "/stream/")
    assert resp.body == b"".join(f"row {i}\n".encode() for i in range(10))
    assert get(server.port, "/boom/").status == 500
    assert get(server.port, "/missing/").status == 404
    # CommonMiddleware's APPEND_SLASH redirect.
    resp = get(server.port, "/info")
    assert resp.status == 301 and resp.header("Location") == "/info/"
