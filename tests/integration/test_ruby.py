"""Real Sinatra and Rails 6.1 apps served through appmanager's Ruby shim."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from conftest import APPS, HttpReader, connect, get, request
from test_frameworks import multipart, post


def test_sinatra(server_factory) -> None:
    server = server_factory(APPS / "sinatra_app")
    assert "app type:     rack (config.ru)" in server.banner
    assert get(server.port).body == b"Hello from Sinatra"
    assert get(server.port, "/hello/appmanager").body == b"Hello, appmanager!"
    data = json.loads(get(server.port, "/search?q=rack&page=3").body)
    assert data == {"q": "rack", "page": 3, "script_name": ""}
    resp = post(server.port, "/json", b'{"langs": ["ruby", "python"]}', "application/json")
    assert json.loads(resp.body) == {
        "received": {"langs": ["ruby", "python"]},
        "content_length": "29",
    }
    resp = post(
        server.port, "/form", b"name=am&tags[]=a&tags[]=b", "application/x-www-form-urlencoded"
    )
    assert json.loads(resp.body) == {"name": "am", "tags": ["a", "b"]}
    blob = os.urandom(2 * 1024 * 1024)
    body, ctype = multipart("file", "blob.bin", blob)
    for chunked in (False, True):
        resp = post(server.port, "/upload", body, ctype, chunked=chunked)
        info = json.loads(resp.body)
        assert info["size"] == len(blob) and info["sha256"] == hashlib.sha256(blob).hexdigest()
    stream = get(server.port, "/stream")
    assert stream.body == b"first;second;third"
    assert get(server.port, "/halt").status == 403
    missing = get(server.port, "/nope")
    assert missing.status == 404 and missing.body == b"custom not found"
    error = get(server.port, "/error")
    assert error.status == 500 and b"sinatra route failed" in error.body


def test_sinatra_under_a_base_uri(server_factory) -> None:
    server = server_factory(APPS / "sinatra_app", "--base-uri", "/sub")
    data = json.loads(get(server.port, "/sub/search?q=x").body)
    assert data["script_name"] == "/sub"
    assert get(server.port, "/elsewhere").status == 404


def test_rails(server_factory, tmp_path: Path) -> None:
    server = server_factory(APPS / "rails_app", "--min-instances", "2")
    assert get(server.port).body == b"Hello from Rails"
    show = json.loads(get(server.port, "/items/42?q=find").body)
    assert show == {"id": "42", "q": "find", "path": "/items/42", "script_name": ""}
    resp = post(server.port, "/items", b'{"item": {"name": "box", "count": 3}}', "application/json")
    assert resp.status == 201
    assert json.loads(resp.body)["item"] == {"name": "box", "count": 3}
    resp = post(
        server.port, "/items", b"item[name]=bag&item[count]=2", "application/x-www-form-urlencoded"
    )
    assert json.loads(resp.body)["item"] == {"name": "bag", "count": "2"}
    assert get(server.port, "/fail").status == 500
    assert get(server.port, "/no/such/route").status == 404
    # Rails logs to stdout: the core captures it with the app and pid.
    server.wait_for_log("Processing by ItemsController#show")


def test_rails_relative_url_root(server_factory) -> None:
    server = server_factory(APPS / "rails_app", "--base-uri", "/shop")
    show = json.loads(get(server.port, "/shop/items/7").body)
    assert show["script_name"] == "/shop" and show["path"] == "/shop/items/7"


def test_rack_environment_follows_environment(server_factory) -> None:
    server = server_factory(APPS / "echo_rack", "-e", "staging")
    env = json.loads(get(server.port).body)
    assert env["rack.multiprocess"] is True
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    with connect(server.port) as sock:
        reader = HttpReader(sock)
        for name in ("RACK_ENV", "RAILS_ENV"):
            sock.sendall(f"GET /app/env?{name} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            assert reader.read().body == b"staging"


def test_ruby_crash_is_502_and_replaced(server_factory) -> None:
    server = server_factory(APPS / "echo_rack")
    pid = get(server.port, "/app/pid").body
    assert get(server.port, "/app/crash").status == 502
    assert get(server.port, "/app/pid").body != pid
    assert (
        request(server.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").status
        == 200
    )
