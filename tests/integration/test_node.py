"""A real Express app, and one core serving Rails, Django and Express side by side."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import APPS, HttpReader, connect, get, request
from test_frameworks import post


def test_express(server_factory) -> None:
    server = server_factory(APPS / "express_app", "-e", "staging")
    assert "app type:     node (app.js)" in server.banner
    root = json.loads(get(server.port).body)
    assert root["hello"] == "express" and root["env"] == "staging"
    info = json.loads(get(server.port, "/info").body)
    assert info["path"] == "/info" and info["hostname"] == "localhost"
    resp = post(server.port, "/json", b'{"a": 1, "b": [true]}', "application/json")
    assert resp.status == 201 and json.loads(resp.body) == {"received": {"a": 1, "b": [True]}}
    resp = post(
        server.port, "/json", b'{"big": "' + b"x" * 50000 + b'"}', "application/json", chunked=True
    )
    assert resp.status == 201
    resp = post(server.port, "/form", b"name=am&lang=js", "application/x-www-form-urlencoded")
    assert json.loads(resp.body) == {"received": {"name": "am", "lang": "js"}}
    user = json.loads(get(server.port, "/users/7?tab=posts").body)
    assert user == {"id": "7", "query": {"tab": "posts"}}
    assert get(server.port, "/stream").body == b"chunk 0\nchunk 1\nchunk 2\n"
    assert get(server.port, "/nope").status == 404
    error = get(server.port, "/error")
    assert error.status == 500 and json.loads(error.body) == {"error": "express error route"}
    assert get(server.port, "/throw").status == 500
    server.wait_for_log("express app listening")


def test_express_under_a_base_uri(server_factory) -> None:
    server = server_factory(APPS / "express_app", "--base-uri", "/node")
    info = json.loads(get(server.port, "/node/info").body)
    assert info["path"] == "/info"
    assert get(server.port, "/info").status == 404


def test_node_keeps_connections_and_balances_them(server_factory) -> None:
    server = server_factory(APPS / "express_app", "--min-instances", "2", "--max-pool-size", "2")
    pids = set()
    socks = [connect(server.port) for _ in range(4)]
    try:
        for sock in socks:
            reader = HttpReader(sock)
            for _ in range(3):
                sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                pids.add(json.loads(reader.read().body)["pid"])
    finally:
        for sock in socks:
            sock.close()
    assert len(pids) == 2, "connections should be spread over both Node processes"


def test_node_serves_many_slow_requests_at_once(server_factory) -> None:
    server = server_factory(APPS / "echo_node", "--max-pool-size", "1")
    start = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: get(server.port, "/app/sleep?1"), range(6)))
    assert all(r.status == 200 for r in results)
    assert time.monotonic() - start < 2.5


def test_rails_django_and_express_in_one_core(server_factory, tmp_path: Path) -> None:
    conf = tmp_path / "appmanager.toml"
    conf.write_text(
        f"""
max_pool_size = 6

[[app]]
root = "{APPS / "rails_app"}"
server_names = ["rails.test"]

[[app]]
root = "{APPS / "django_project"}"
server_names = ["django.test"]

[[app]]
root = "{APPS / "express_app"}"
server_names = ["express.test"]

[[app]]
root = "{APPS / "fastapi_app"}"
base_uri = "/api"
"""
    )
    server = server_factory(None, "--config", str(conf))

    def host(name: str, path: str = "/") -> bytes:
        raw = f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()
        return request(server.port, raw).body

    for _ in range(3):
        assert host("rails.test") == b"Hello from Rails"
        assert host("django.test") == b"Hello from Django\n"
        assert json.loads(host("express.test"))["hello"] == "express"
        assert json.loads(host("any.test", "/api/items/3")) == {"item_id": 3, "q": None}
    # Mixed traffic at once, on keep-alive connections.
    with ThreadPoolExecutor(8) as pool:
        bodies = list(
            pool.map(
                lambda name: host(name),
                ["rails.test", "django.test", "express.test"] * 6,
            )
        )
    assert bodies.count(b"Hello from Rails") == 6
    assert bodies.count(b"Hello from Django\n") == 6
