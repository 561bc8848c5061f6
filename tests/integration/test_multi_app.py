"""Many apps in one core: routing by Host and base URI, 404 for no app, a broken app beside working
ones, mass deployment, and generic apps behind the proxy."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import APPS, HttpReader, connect, get, request


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "appmanager.toml"
    path.write_text(text)
    return path


def host_get(port: int, host: str, path: str = "/") -> object:
    raw = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    return request(port, raw)


def test_routing_by_host_and_base_uri(server_factory, tmp_path: Path) -> None:
    conf = write_config(
        tmp_path,
        f"""
[[app]]
root = "{APPS / "wsgi_echo"}"
server_names = ["echo.test"]
env_var = {{ ECHO_CLOSE_MARKER = "{tmp_path / "marker"}" }}

[[app]]
root = "{APPS / "flask_app"}"
startup_file = "app.py"
server_names = ["echo.test"]
base_uri = "/flask"

[[app]]
root = "{APPS / "django_project"}"
server_names = ["django.test"]
""",
    )
    server = server_factory(None, "--config", str(conf))
    assert "server names: echo.test" in server.banner
    assert "base uri:     /flask" in server.banner
    echo = json.loads(host_get(server.port, "echo.test:8080", "/x?y=1").body)
    assert echo["PATH_INFO"] == "/x" and echo["SCRIPT_NAME"] == ""
    flask = host_get(server.port, "Echo.Test", "/flask/")
    assert flask.status == 200 and flask.body == b"Hello from Flask\n"
    assert host_get(server.port, "echo.test", "/flaskish").status == 200  # not the Flask app
    assert json.loads(host_get(server.port, "echo.test", "/flaskish").body)["PATH_INFO"] == (
        "/flaskish"
    )
    assert host_get(server.port, "django.test", "/").body == b"Hello from Django\n"
    missing = host_get(server.port, "other.test", "/")
    assert missing.status == 404
    assert b"no app is configured" in missing.body


def test_one_broken_app_does_not_stop_the_others(server_factory, tmp_path: Path) -> None:
    conf = write_config(
        tmp_path,
        f"""
[[app]]
root = "{APPS / "boot_error"}"
server_names = ["broken.test"]

[[app]]
root = "{APPS / "wsgi_echo"}"
server_names = ["good.test"]
""",
    )
    server = server_factory(None, "--config", str(conf))
    assert "failed to start" in server.banner
    assert host_get(server.port, "broken.test").status == 500
    for _ in range(3):
        assert host_get(server.port, "good.test").status == 200


def test_mass_deployment_serves_each_subdirectory_at_its_name(
    server_factory, tmp_path: Path
) -> None:
    root = tmp_path / "sites"
    root.mkdir()
    os.symlink(APPS / "wsgi_echo", root / "echo.local")
    os.symlink(APPS / "django_project", root / "django.local")
    server = server_factory(root)
    assert json.loads(host_get(server.port, "echo.local").body)["PATH_INFO"] == "/"
    assert host_get(server.port, "django.local").body == b"Hello from Django\n"
    assert host_get(server.port, "nobody.local").status == 404


def test_pipelined_requests_for_different_apps(server_factory, tmp_path: Path) -> None:
    conf = write_config(
        tmp_path,
        f"""
[[app]]
root = "{APPS / "wsgi_echo"}"
base_uri = "/echo"

[[app]]
root = "{APPS / "flask_app"}"
startup_file = "app.py"
base_uri = "/flask"
""",
    )
    server = server_factory(None, "--config", str(conf))
    raw = (
        b"GET /echo/a HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /flask/ HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /echo/b HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    with connect(server.port) as sock:
        sock.sendall(raw)
        reader = HttpReader(sock)
        first = json.loads(reader.read().body)
        assert (first["SCRIPT_NAME"], first["PATH_INFO"]) == ("/echo", "/a")
        assert reader.read().body == b"Hello from Flask\n"
        assert json.loads(reader.read().body)["PATH_INFO"] == "/b"
        assert reader.read().status == 404


def test_env_var_reaches_the_app(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--env-var", "GREETING=hello", "--env-var", "X=1")
    environ = json.loads(get(server.port).body)
    # The echo app shows CGI variables only; the process environment is checked via os.environ.
    assert environ["REQUEST_METHOD"] == "GET"
    generic = server_factory(
        APPS / "generic_app",
        "--app-start-command",
        "python3 server.py",
        "--env-var",
        "GENERIC_GREETING=hello from env",
    )
    assert json.loads(get(generic.port).body)["env"] == "hello from env"


def test_generic_app_behind_the_proxy(server_factory) -> None:
    server = server_factory(
        APPS / "generic_app", "--app-start-command", "python3 server.py", "--min-instances", "2"
    )
    assert "app type:     generic (python3 server.py)" in server.banner
    with connect(server.port) as sock:
        reader = HttpReader(sock)
        for i in range(5):
            sock.sendall(f"GET /k{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            data = json.loads(reader.read().body)
            assert data["path"] == f"/k{i}"
            headers = dict(data["headers"])
            assert headers["X-Forwarded-For"] == "127.0.0.1"
    body = os.urandom(3 * 1024 * 1024)
    raw = b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    raw += b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    data = json.loads(request(server.port, raw, timeout=30).body)
    import hashlib

    assert data["body_len"] == len(body)
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()
    stream = get(server.port, "/app/stream")
    assert stream.body == b"line 0\nline 1\nline 2\n"
    head = request(
        server.port, b"HEAD / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", head_only=True
    )
    assert head.status == 200
    crash = get(server.port, "/app/crash")
    assert crash.status == 502
    server.wait_for_log("exited with status 7")
    assert get(server.port, "/after").status == 200


def test_generic_app_that_never_listens(server_factory, tmp_path: Path) -> None:
    app = tmp_path / "silent"
    app.mkdir()
    server = server_factory(
        app, "--app-start-command", "echo starting; sleep 30", "--start-timeout", "1"
    )
    assert "failed to start: LISTEN failed" in server.banner
    resp = get(server.port)
    assert resp.status == 500


def test_one_connection_reaches_node_python_and_ruby_apps_in_turn(
    server_factory, tmp_path: Path
) -> None:
    """A Node app beside other apps takes requests one at a time, not the whole connection:
    the connection's next request may be another app's."""
    conf = write_config(
        tmp_path,
        f"""
[[app]]
root = "{APPS / "echo_node"}"
base_uri = "/node"

[[app]]
root = "{APPS / "wsgi_echo"}"
base_uri = "/py"

[[app]]
root = "{APPS / "echo_rack"}"
base_uri = "/rb"
""",
    )
    server = server_factory(None, "--config", str(conf))
    with connect(server.port) as sock:
        reader = HttpReader(sock)
        for round_no in range(3):
            sock.sendall(f"GET /node/n{round_no}?q=1 HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            node = json.loads(reader.read().body)
            assert node["url"] == f"/n{round_no}?q=1"
            sock.sendall(f"GET /py/p{round_no} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            assert json.loads(reader.read().body)["PATH_INFO"] == f"/p{round_no}"
            sock.sendall(b"GET /rb/conformance?r=1 HTTP/1.1\r\nHost: t\r\n\r\n")
            assert json.loads(reader.read().body)["query"] == "r=1"
