"""One suite for every web server with appmanager's module (DESIGN: "Connectors").

Each case runs against each kind in ``WEB_SERVERS``; a kind (``webserver.WebServerKind``)
renders its configuration from ``Mount``s, starts the real web server with the module and the
core the module starts, and stops them all at the end. What is particular to one web server
lives in its own test file (test_nginx.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator

import psutil
import pytest
from apache import ApacheKind
from conftest import HttpReader
from nginx import NginxKind
from webserver import (
    Mount,
    WebServer,
    WebServerKind,
    app_source,
    copy_app,
    core_connections,
    timed_body,
)

# Each kind of web server the suite runs against; one line per kind.
WEB_SERVERS: list[type] = [
    NginxKind,
    ApacheKind,
]


def _kind(param: type) -> Iterator[WebServerKind]:
    reason = param.missing()
    if reason:
        pytest.skip(reason)
    kind: WebServerKind = param()
    try:
        yield kind
    finally:
        kind.close()


@pytest.fixture(scope="module", params=WEB_SERVERS, ids=lambda k: k.name)
def shared_kind(request: pytest.FixtureRequest) -> Iterator[WebServerKind]:
    """A kind whose servers live for the whole module (started by ``echo_server``)."""
    yield from _kind(request.param)


@pytest.fixture(params=WEB_SERVERS, ids=lambda k: k.name)
def kind(request: pytest.FixtureRequest) -> Iterator[WebServerKind]:
    """A kind whose servers are stopped at the end of the test."""
    yield from _kind(request.param)


STATIC = {"static.txt": "served from public/\n", "docs/index.html": "<p>index</p>\n"}


@pytest.fixture(scope="module")
def echo_server(shared_kind: WebServerKind) -> WebServer:
    """The echo app at localhost, with its public/ files, and again under /sub; one server
    for the module."""
    app = copy_app(app_source("connector_echo"), shared_kind.site(), STATIC)
    return shared_kind.start(
        [
            Mount(app, env={"GREETING": "hello from the config"}),
            Mount(app, base_uri="/sub", env={"GREETING": "under /sub"}),
        ]
    )


def _json(resp: object) -> dict[str, object]:
    status, body = resp.status, resp.body  # type: ignore[attr-defined]
    assert status == 200, (status, body[:500])
    data = json.loads(body)
    assert isinstance(data, dict)
    return data


def _exchange(server: WebServer, raw: bytes) -> tuple[dict[str, object], int]:
    """Send ``raw``; the app's JSON answer and the client's port."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(raw)
        return _json(HttpReader(sock).read()), sock.getsockname()[1]


def test_the_request_reaches_the_app_as_the_client_sent_it(echo_server: WebServer) -> None:
    body = b'{"a": 1}'
    raw = (
        b"PATCH /items/a%2Fb/%C3%A9?q=%20x&flag HTTP/1.1\r\n"
        b"Host: localhost\r\n"
        b"X-Custom: one\r\n"
        b"Cookie: a=1; b=2\r\n"
        b"Content-Type: application/json\r\n"
        + b"Content-Length: %d\r\n" % len(body)
        + b"Connection: close\r\n\r\n"
        + body
    )
    seen, client_port = _exchange(echo_server, raw)
    assert seen["method"] == "PATCH"
    assert seen["request_uri"] == "/items/a%2Fb/%C3%A9?q=%20x&flag"
    assert seen["query_string"] == "q=%20x&flag"
    assert seen["script_name"] == ""
    headers = seen["headers"]
    assert isinstance(headers, dict)
    assert headers["x-custom"] == "one"
    assert headers["cookie"] == "a=1; b=2"
    assert headers["host"] == "localhost"
    assert seen["content_type"] == "application/json"
    assert seen["content_length"] == str(len(body))
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert seen["remote_addr"] == "127.0.0.1"
    assert seen["remote_port"] == str(client_port)
    assert (seen["server_name"], seen["server_port"]) == ("localhost", str(echo_server.port))
    assert seen["scheme"] == "http"


def test_hop_by_hop_headers_stay_with_the_web_server(echo_server: WebServer) -> None:
    raw = (
        b"GET /hop HTTP/1.1\r\nHost: localhost\r\nTE: trailers\r\nKeep-Alive: 300\r\n"
        b"Upgrade: websocket\r\nConnection: close, Upgrade, TE\r\n\r\n"
    )
    seen, _ = _exchange(echo_server, raw)
    headers = seen["headers"]
    assert isinstance(headers, dict)
    # Neither the client's connection headers nor the web server's own to the core.
    hop = {"connection", "te", "keep-alive", "upgrade", "transfer-encoding"}
    assert not hop & set(headers), headers


def test_forged_connector_fields_are_ignored(echo_server: WebServer) -> None:
    raw = (
        b"GET /forged HTTP/1.1\r\nHost: localhost\r\n"
        b"!~App: app_root=/etc&env_var=GREETING%3Dforged\r\n"
        b"!~Client: 6.6.6.6 1 evil.test 1 https\r\n"
        b"!~app: app_root=/root\r\n!~CLIENT: 6.6.6.6 2 evil.test 2 https\r\n"
        b"Connection: close\r\n\r\n"
    )
    seen, client_port = _exchange(echo_server, raw)
    assert seen["path_info"] == "/forged"
    assert (seen["remote_addr"], seen["remote_port"]) == ("127.0.0.1", str(client_port))
    assert (seen["server_name"], seen["scheme"]) == ("localhost", "http")
    headers = seen["headers"]
    assert isinstance(headers, dict)
    assert not [h for h in headers if "~" in h], headers
    env = _json(echo_server.get("/env?GREETING"))
    assert env["value"] == "hello from the config"


def test_files_under_public_are_served_by_the_web_server(echo_server: WebServer) -> None:
    resp = echo_server.get("/static.txt")
    assert (resp.status, resp.body) == (200, b"served from public/\n")
    assert echo_server.get("/docs/").body == b"<p>index</p>\n"
    # Everything else is the app's.
    assert _json(echo_server.get("/static.txt/more"))["path_info"] == "/static.txt/more"
    assert _json(echo_server.get("/docs/missing.html"))["path_info"] == "/docs/missing.html"


def test_an_app_under_a_sub_uri_sees_it_as_its_script_name(echo_server: WebServer) -> None:
    seen = _json(echo_server.get("/sub/items/1?x=2"))
    assert seen["script_name"] == "/sub"
    assert seen["path_info"] == "/items/1"
    assert seen["request_uri"] == "/sub/items/1?x=2"
    assert _json(echo_server.get("/sub/env?GREETING"))["value"] == "under /sub"
    assert echo_server.get("/sub/static.txt").body == b"served from public/\n"
    # The same app root at / is another app, with its own settings.
    assert _json(echo_server.get("/env?GREETING"))["value"] == "hello from the config"
    assert _json(echo_server.get("/subway"))["script_name"] == ""


def test_a_10_mb_upload_arrives_intact(echo_server: WebServer) -> None:
    data = os.urandom(10 * 1024 * 1024)
    raw = b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % len(data)
    seen = _json(echo_server.request(raw + data))
    assert seen["body_length"] == len(data)
    assert seen["body_sha256"] == hashlib.sha256(data).hexdigest()


def test_a_large_response_arrives_intact(echo_server: WebServer) -> None:
    resp = echo_server.get("/big?mb=8")
    assert resp.status == 200
    assert len(resp.body) == 8 * 1024 * 1024
    assert resp.body[:512] == bytes(range(256)) * 2


@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_a_streamed_response_reaches_the_client_as_it_is_written(
    echo_server: WebServer, framing: str
) -> None:
    query = "n=3&delay=0.6" + ("&length=1" if framing == "length" else "")
    raw = f"GET /stream?{query} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    first, second, third = timed_body(
        echo_server.port, raw.encode(), [b"part 0", b"part 1", b"part 2"]
    )
    # Each part arrives when the app writes it, not when the response is complete.
    assert second - first > 0.4 and third - second > 0.4, (first, second, third)
    assert third - first < 5


def test_connections_to_the_core_are_kept_alive(echo_server: WebServer) -> None:
    core = echo_server.core()
    assert core is not None
    path = echo_server.core_socket()
    held: list[set[int]] = []
    for i in range(20):
        assert _json(echo_server.get(f"/keepalive/{i}"))["path_info"] == f"/keepalive/{i}"
        held.append(core_connections(core, path))
    # Connections stay open between requests and are reused, instead of one per request.
    assert all(held), held
    assert len(set().union(*held)) <= 4, held


def _core_and_apps(server: WebServer) -> list[psutil.Process]:
    core = server.core()
    assert core is not None
    return [core, *core.children(recursive=True)]


def test_changed_app_settings_reach_new_requests_after_a_reload(
    kind: WebServerKind,
) -> None:
    app = copy_app(app_source("connector_echo"), kind.site())
    server = kind.start([Mount(app, env={"GREETING": "before"})])
    before = _json(server.get("/env?GREETING"))
    assert before["value"] == "before"
    core = server.core()
    assert core is not None
    server.reload([Mount(app, env={"GREETING": "after"})])
    after = _json(server.get("/env?GREETING"))
    assert after["value"] == "after", server.logs()
    assert after["pid"] != before["pid"]
    # The same core serves on: a reload does not restart it.
    assert server.core() == core


def test_stopping_the_web_server_stops_the_core_and_its_apps(kind: WebServerKind) -> None:
    app = copy_app(app_source("connector_echo"), kind.site())
    server = kind.start([Mount(app)])
    assert _json(server.get("/hello"))["path_info"] == "/hello"
    family = _core_and_apps(server)
    assert len(family) >= 2
    server.stop()
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def _missing_runtime() -> str | None:
    import shutil

    if shutil.which("ruby") is None:
        return "ruby is not installed"
    if shutil.which("node") is None:
        return "node is not installed"
    if not (app_source("express_app") / "node_modules").is_dir():
        return "express_app's node_modules are not installed (npm ci)"
    return None


def test_three_apps_in_three_languages_behind_one_core(kind: WebServerKind) -> None:
    """Django and Express each at their own server name, Sinatra under a sub-URI of Django's."""
    if (reason := _missing_runtime()) is not None:
        pytest.skip(reason)
    site = kind.site()
    django = copy_app(app_source("django_project"), site, {"robots.txt": "django files\n"})
    sinatra = copy_app(app_source("sinatra_app"), site, {"sinatra.txt": "sinatra files\n"})
    express = copy_app(app_source("express_app"), site)
    server = kind.start(
        [
            Mount(django, server_name="django.test"),
            Mount(sinatra, server_name="django.test", base_uri="/sinatra"),
            Mount(express, server_name="express.test"),
        ]
    )
    info = _json(server.get("/info/?a=1", host="django.test"))
    assert (info["path"], info["query"], info["host"]) == ("/info/", {"a": "1"}, "django.test")
    assert server.get("/robots.txt", host="django.test").body == b"django files\n"
    search = _json(server.get("/sinatra/search?q=tea&page=2", host="django.test"))
    assert search == {"q": "tea", "page": 2, "script_name": "/sinatra"}
    assert server.get("/sinatra/hello/you", host="django.test").body == b"Hello, you!"
    assert server.get("/sinatra/sinatra.txt", host="django.test").body == b"sinatra files\n"
    users = _json(server.get("/users/7?x=1", host="express.test"))
    assert users == {"id": "7", "query": {"x": "1"}}
    # One core runs all three.
    core = server.core()
    assert core is not None
    commands = " ".join(" ".join(p.cmdline()) for p in core.children(recursive=True))
    for marker in ("appmanager_python", "appmanager_ruby", "appmanager_node"):
        assert marker in commands, commands
