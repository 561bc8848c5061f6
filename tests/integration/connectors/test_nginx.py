"""nginx-only tests of appmanager's module: building it, its directives and their checks, the
exact requests it writes and the responses it reads (against a stand-in core), TLS, a core
started separately, and ``appmanager start --engine nginx``. What every web server must do
is in the shared suite, test_connector_suite.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qsl

import psutil
import pytest
from conftest import HttpReader, Response, free_port, request
from fakecore import FakeCore, Received, Reply, ok
from nginx import NGINX, NginxFactory, NginxServer, module_path, nginx_fixture, quote  # noqa: F401
from webserver import app_source, copy_app

AS_ROOT = os.geteuid() == 0

FakeSetup = Callable[..., tuple[NginxServer, FakeCore]]

FAKE_SECRET = "5ec2e7" * 4


@pytest.fixture
def fake(nginx: NginxFactory) -> Iterator[FakeSetup]:
    """An nginx whose module talks to a stand-in core: ``fake(location_directives, respond)``
    returns the server and the stand-in, whose ``requests`` are what the module sent."""
    cores: list[FakeCore] = []

    def setup(
        directives: str = "",
        respond: Callable[[Received], Reply] | None = None,
        *,
        root: str = "SITE/app/public",
        top: str = "",
        server: str = "",
    ) -> tuple[NginxServer, FakeCore]:
        site = nginx.site()
        core = FakeCore(site / "core.sock", respond)
        # The secret a real core writes next to its socket; the master reads it at start.
        (site / "core.sock.secret").write_text(f"{FAKE_SECRET}\n")
        cores.append(core)
        body = (
            "server {\n    listen LISTEN;\n    server_name localhost;\n"
            f"    root {root};\n"
            f"    {server}\n    location / {{\n        appmanager_enabled on;\n"
            f"        {directives}\n    }}\n}}\n"
        )
        top = f"appmanager_core_socket {quote(site / 'core.sock')};\n{top}"
        return nginx.start(body.replace("SITE", str(site)), top=top, core=False), core

    yield setup
    for core in cores:
        core.close()


def raw_request(port: int, data: bytes, timeout: float = 15.0) -> tuple[Response, int]:
    """Send ``data`` on a new connection; the response and the client's port."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        client_port = sock.getsockname()[1]
        sock.sendall(data)
        return HttpReader(sock).read(), client_port


# -- building --------------------------------------------------------------------------------


def test_module_build_prints_the_module_path_last(tmp_path: Path) -> None:
    if (reason := _missing()) is not None:
        pytest.skip(reason)
    result = subprocess.run(
        [sys.executable, "-m", "appmanager", "nginx-module", "build", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last == str(tmp_path / "ngx_http_appmanager_module.so")
    assert Path(last).read_bytes() == module_path().read_bytes()


def test_module_build_names_the_packages_it_needs(tmp_path: Path) -> None:
    # No compiler or make on this PATH: the build stops before looking at its cache.
    result = subprocess.run(
        [sys.executable, "-m", "appmanager", "nginx-module", "build"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)},
        timeout=60,
    )
    assert result.returncode == 1
    assert "apt-get install build-essential" in result.stderr, result.stderr


def _missing() -> str | None:
    from nginx import missing

    return missing()


# -- directives ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("directive", "where", "message"),
    [
        ("appmanager_min_instances -1", "location", "must be at least 0"),
        ("passenger_max_pool_size 0", "http", "must be at least 1"),
        ("appmanager_start_timeout soon", "location", "must be a number"),
        ("passenger_max_requests 1.5", "server", "must be an integer"),
        ("passenger_app_type perl", "location", "must be one of wsgi|asgi|rack|node|generic"),
        ("appmanager_base_uri sub", "location", "must be a path starting with /"),
        ("appmanager_user no-such-user", "location", 'user "no-such-user" does not exist'),
        ("passenger_group no-such-group", "location", 'group "no-such-group" does not exist'),
        ("appmanager_custom_error_page /no/such/page.html", "server", "does not exist"),
        ("appmanager_metrics_address localhost", "http", "must be HOST:PORT"),
        ("passenger_pre_start ftp://localhost/", "http", "must be an http:// or https:// URL"),
        ("appmanager_enabled maybe", "server", "must be on or off"),
        ('appmanager_app_start_command " "', "location", "must not be empty"),
        ("appmanager_env_var A=B C", "location", 'needs a variable name without "="'),
        ("appmanager_max_pool_size 4", "server", "is not allowed here"),
        ("appmanager_core_socket /tmp/x.sock", "location", "is not allowed here"),
        ("appmanager_environment a b", "location", "invalid number of arguments"),
        ("appmanager_min_instances 1; appmanager_min_instances 2", "location", "is duplicate"),
    ],
)
def test_a_bad_value_fails_the_configuration_test_naming_the_directive(
    nginx: NginxFactory, directive: str, where: str, message: str
) -> None:
    blocks = {"http": "", "server": "", "location": ""}
    blocks[where] = directive + ";"
    body = (
        f"server {{ listen LISTEN; {blocks['server']} "
        f"location / {{ appmanager_enabled on; {blocks['location']} }} }}"
    )
    result = nginx.config_test(body, top=blocks["http"])
    assert result.returncode != 0
    name = directive.split()[0]
    assert f'"{name}"' in result.stderr and message in result.stderr, result.stderr


def test_root_may_not_be_an_app_user(nginx: NginxFactory) -> None:
    result = nginx.config_test("server { listen LISTEN; location / { appmanager_user root; } }")
    assert result.returncode != 0
    assert '"appmanager_user": apps never run as root' in result.stderr, result.stderr


def test_app_settings_are_sent_once_computed_from_every_level(fake: FakeSetup) -> None:
    server, core = fake(
        "passenger_app_env staging; passenger_env_var A '1 2'; appmanager_env_var B x=y;"
        " passenger_min_instances 2; passenger_friendly_error_pages on;"
        " passenger_startup_file app.py; passenger_ruby /usr/bin/ruby;",
        top="appmanager_env_var TOP 1; passenger_root /opt/passenger;"
        " passenger_instance_registry_dir /tmp; passenger_disable_security_update_check on;",
        server="passenger_max_requests 100; passenger_load_shell_envvars off;",
    )
    for _ in range(2):
        assert server.get("/").status == 200
    apps = [r.header("!~App") for r in core.requests]
    assert apps[0] == apps[1]
    assert apps[0] is not None
    site = core.path.parent
    # Registry order; the app root (the parent of root) first; values percent-encoded.
    expected = [
        ("app_root", str(site / "app")),
        ("environment", "staging"),
        ("startup_file", "app.py"),
        ("ruby", "/usr/bin/ruby"),
        ("env_var", "TOP=1"),
        ("env_var", "A=1 2"),
        ("env_var", "B=x=y"),
        ("friendly_error_pages", "on"),
        *([("user_switching", "off")] if AS_ROOT else []),
        ("min_instances", "2"),
        ("max_requests", "100"),
    ]
    assert parse_qsl(apps[0], strict_parsing=True) == expected
    assert "env_var=A%3D1%202&env_var=B%3Dx%3Dy" in apps[0]


def test_the_app_root_of_a_root_with_variables_is_found_per_request(fake: FakeSetup) -> None:
    server, core = fake("", root="SITE/$host/public")
    assert server.get("/", host="localhost").status == 200
    assert server.get("/", host="other.test").status == 200
    roots = [dict(parse_qsl(r.header("!~App") or ""))["app_root"] for r in core.requests]
    site = core.path.parent
    assert roots == [str(site / "localhost"), str(site / "other.test")]


# -- requests as the module writes them --------------------------------------------------------


def test_the_request_reaches_the_core_as_the_protocol_says(fake: FakeSetup) -> None:
    server, core = fake()
    raw = (
        b"POST /a%20b/./c?x=%2F&y=1 HTTP/1.1\r\n"
        b"Host: localhost\r\n"
        b"X-Custom: kept\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Length: 5\r\n"
        b"Connection: keep-alive, TE\r\n"
        b"Keep-Alive: 300\r\n"
        b"TE: trailers\r\n"
        b"Upgrade: websocket\r\n"
        b"!~App: app_root=/etc\r\n"
        b"!~client: 6.6.6.6 1 evil 1 https\r\n"
        b"!~APP: app_root=/root\r\n"
        b"\r\n"
        b"hello"
    )
    resp, client_port = raw_request(server.port, raw)
    assert resp.status == 200
    (received,) = core.requests
    assert received.request_line == "POST /a%20b/./c?x=%2F&y=1 HTTP/1.1"
    names = [name.lower() for name, _ in received.headers]
    for hop in ("connection", "keep-alive", "te", "upgrade", "transfer-encoding", "expect"):
        assert hop not in names
    assert received.header("X-Custom") == "kept"
    assert received.header("Content-Type") == "text/plain"
    assert received.header("Content-Length") == "5"
    assert received.body == b"hello"
    assert received.header("!~Client") == f"127.0.0.1 {client_port} localhost {server.port} http"
    site = core.path.parent
    switching = "&user_switching=off" if AS_ROOT else ""
    assert received.header("!~App") == f"app_root={site}/app{switching}"
    assert received.header("!~Secret") == FAKE_SECRET
    assert [n for n in names if n.startswith("!~")] == ["!~client", "!~app", "!~secret"]


def test_a_client_without_host_gets_the_server_name_and_no_body_no_length(
    fake: FakeSetup,
) -> None:
    server, core = fake()
    resp, _ = raw_request(server.port, b"GET /x HTTP/1.0\r\n\r\n")
    assert resp.status == 200
    (received,) = core.requests
    assert received.request_line == "GET /x HTTP/1.1"
    assert received.header("Host") == "localhost"
    assert received.header("Content-Length") is None


def test_a_chunked_body_is_read_whole_and_sent_with_its_length(fake: FakeSetup) -> None:
    server, core = fake("appmanager_request_buffering off;")
    raw = (
        b"PUT /up HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    )
    resp, _ = raw_request(server.port, raw)
    assert resp.status == 200
    (received,) = core.requests
    assert received.header("Content-Length") == "7"
    assert received.header("Transfer-Encoding") is None
    assert received.body == b"abcdefg"


@pytest.mark.parametrize("buffering", ["on", "off"])
def test_request_buffering_off_streams_a_body_of_known_length(
    fake: FakeSetup, buffering: str
) -> None:
    server, core = fake(f"appmanager_request_buffering {buffering};")
    half = b"x" * 50_000
    head = b"POST /up HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(head + half)
        early = core.head_arrived.wait(1.0)
        sock.sendall(half)
        assert HttpReader(sock).read().status == 200
    # Streamed, the core has the head while the client is still sending; buffered, only after.
    assert early == (buffering == "off")
    assert core.requests[0].body == half + half


# -- responses as the module reads them --------------------------------------------------------


def _scripted(received: Received) -> Reply:
    path = received.request_line.split()[1]
    if path == "/chunked":
        return Reply(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nhel\r\n2\r\nlo\r\n0\r\nX-Trailer: t\r\n\r\n"
        )
    if path == "/until-close":
        return Reply(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nbye", close=True)
    if path == "/connection-close":
        return Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi", True)
    if path == "/empty":
        return Reply(b"HTTP/1.1 204 No Content\r\nX-Seen: 1\r\n\r\n")
    if path == "/hints":
        return Reply(
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
            b"HTTP/1.1 201 Made Here\r\nContent-Length: 4\r\n\r\nmade"
        )
    if received.request_line.startswith("HEAD "):
        return Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    return ok(b"hello")


def test_every_framing_reaches_the_client_and_only_clean_ones_are_reused(
    fake: FakeSetup,
) -> None:
    server, core = fake("", _scripted)
    steps = [
        ("GET", "/length", 200, b"hello"),
        ("GET", "/length", 200, b"hello"),
        ("GET", "/chunked", 200, b"hello"),
        ("HEAD", "/head", 200, b""),
        ("GET", "/empty", 204, b""),
        ("GET", "/hints", 201, b"made"),
        ("GET", "/until-close", 200, b"bye"),
        ("GET", "/length", 200, b"hello"),
        ("GET", "/connection-close", 200, b"hi"),
        ("GET", "/length", 200, b"hello"),
    ]
    for method, path, status, body in steps:
        raw = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        resp = request(server.port, raw.encode(), head_only=method == "HEAD")
        assert (resp.status, resp.body) == (status, body), (path, server.logs())
        if path == "/hints":
            assert resp.reason == "Made Here"
    # One connection until a response ends by closing or says Connection: close.
    assert [r.connection for r in core.requests] == [1, 1, 1, 1, 1, 1, 1, 2, 2, 3]


def test_a_core_that_is_not_there_gets_502_and_a_log_line_naming_its_socket(
    nginx: NginxFactory,
) -> None:
    site = nginx.site()
    body = "server { listen LISTEN; location / { appmanager_enabled on; } }"
    server = nginx.start(body, top=f"appmanager_core_socket {site}/gone.sock;", core=False)
    assert server.get("/").status == 502
    assert f"{site}/gone.sock" in server.error_log()


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("exits", "appmanager: the core exited with status 3 before listening on"),
        ("missing", 'appmanager: cannot run the core command "'),
    ],
)
def test_nginx_does_not_start_when_its_core_cannot(
    nginx: NginxFactory, command: str, message: str
) -> None:
    site = nginx.site()
    script = site / "appmanager"
    script.write_text("#!/bin/sh\necho 'the core cannot start' >&2\nexit 3\n")
    script.chmod(0o755)
    core_command = script if command == "exits" else site / "no-such-appmanager"
    server = nginx.make(
        "server { listen LISTEN; location / { appmanager_enabled on; } }",
        top=f"appmanager_core_command {core_command};",
    )
    result = subprocess.run(
        [NGINX, "-p", str(server.run_dir), "-c", str(server.conf_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# -- with the real core ------------------------------------------------------------------------


@pytest.fixture
def echo_app(nginx: NginxFactory) -> Path:
    return copy_app(app_source("connector_echo"), nginx.site(), {"static.txt": "from a file\n"})


def test_the_core_gets_the_http_level_settings_and_the_worker_user(
    nginx: NginxFactory, echo_app: Path
) -> None:
    body = f"server {{ listen LISTEN; root {echo_app}/public; appmanager_enabled on; }}"
    server = nginx.start(body, top="passenger_max_pool_size 3; appmanager_log_level debug;")
    core = server.core()
    assert core is not None
    cmdline = core.cmdline()
    run = server.run_dir
    assert cmdline[cmdline.index("core") :] == [
        "core",
        "--socket", f"{run}/instance/connector.sock",
        "--instance-dir", f"{run}/instance",
        *(["--connector-user", "nobody"] if AS_ROOT else []),
        "--lifeline-fd", "3",
        "--max-pool-size", "3",
        "--shutdown-timeout", "5",
        "--log-file", f"{run}/core.log",
        "--log-level", "debug",
    ]  # fmt: skip
    assert server.get("/static.txt").status == 200


def test_without_an_instance_directory_the_core_gets_a_fresh_private_one(
    nginx: NginxFactory, echo_app: Path
) -> None:
    tmp = nginx.site()
    body = f"server {{ listen LISTEN; root {echo_app}/public; appmanager_enabled on; }}"
    server = nginx.make(body)
    text = server.conf_path.read_text()
    server.conf_path.write_text(
        "\n".join(line for line in text.splitlines() if "appmanager_instance_dir" not in line)
    )
    server.start(env={"TMPDIR": str(tmp)})
    # (the core keeps its per-user registry of instances there too)
    (instance,) = tmp.glob("appmanager-nginx.*")
    assert instance.stat().st_uid == os.geteuid()
    core = server.core()
    assert core is not None
    assert core.cmdline()[core.cmdline().index("--socket") + 1] == f"{instance}/connector.sock"
    assert server.get("/static.txt").status == 200
    assert json.loads(server.get("/app").body)["path_info"] == "/app"


def test_a_core_started_on_its_own_serves_and_outlives_nginx(
    nginx: NginxFactory, echo_app: Path, tmp_path: Path
) -> None:
    site = nginx.site()
    sock = site / "core.sock"
    user = "nobody" if AS_ROOT else None
    core = subprocess.Popen(
        [sys.executable, "-m", "appmanager", "core", "--socket", str(sock),
         "--instance-dir", str(site / "instance"), "--log-file", str(tmp_path / "core.log"),
         "--shutdown-timeout", "5", *(["--connector-user", user] if user else [])],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        body = f"server {{ listen LISTEN; root {echo_app}/public; appmanager_enabled on; }}"
        server = nginx.start(body, top=f"appmanager_core_socket {sock};", core=False)
        assert server.core() is None
        resp = server.get("/who")
        assert resp.status == 200, server.logs()
        assert json.loads(resp.body)["path_info"] == "/who"
        server.stop()
        assert core.poll() is None
    finally:
        core.send_signal(signal.SIGTERM)
        assert core.wait(30) == 0


def test_a_post_to_a_file_goes_to_the_app(nginx: NginxFactory, echo_app: Path) -> None:
    body = f"server {{ listen LISTEN; root {echo_app}/public; passenger_enabled on; }}"
    server = nginx.start(body, top="passenger_root /usr/lib/passenger;")
    assert server.get("/static.txt").body == b"from a file\n"
    raw = b"POST /static.txt HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\nhi"
    resp = server.request(raw)
    assert json.loads(resp.body)["path_info"] == "/static.txt", server.logs()


@pytest.mark.parametrize("buffering", ["on", "off"])
def test_large_uploads_arrive_intact_buffered_or_not(
    nginx: NginxFactory, echo_app: Path, buffering: str
) -> None:
    body = (
        f"server {{ listen LISTEN; root {echo_app}/public; appmanager_enabled on;"
        f" appmanager_request_buffering {buffering}; }}"
    )
    server = nginx.start(body)
    data = os.urandom(10 * 1024 * 1024)
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (len(part), part)
        for part in (data[i : i + 1_000_000] for i in range(0, len(data), 1_000_000))
    )
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    for framing, payload in (
        (b"Content-Length: %d" % len(data), data),
        (b"Transfer-Encoding: chunked", chunked + b"0\r\n\r\n"),
    ):
        raw = b"PUT /up HTTP/1.1\r\nHost: localhost\r\n" + framing + b"\r\n\r\n" + payload
        resp = server.request(raw)
        seen = json.loads(resp.body)
        assert (seen["body_length"], seen["body_sha256"]) == (len(data), digest)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key, readable by nginx's master."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_https_reaches_the_app_as_https(
    nginx: NginxFactory, echo_app: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    body = (
        f"server {{ listen LISTEN ssl; server_name localhost; ssl_certificate {cert};"
        f" ssl_certificate_key {key}; root {echo_app}/public; appmanager_enabled on; }}"
    )
    server = nginx.make(body, tls=True)
    server.start()
    seen = json.loads(server.get("/secure").body)
    assert (seen["scheme"], seen["server_port"]) == ("https", str(server.port))


# -- appmanager start --engine nginx -----------------------------------------------------------


def test_nginx_config_prints_a_configuration_nginx_accepts(
    nginx: NginxFactory, echo_app: Path
) -> None:
    run_dir = nginx.new_dir("nginx-config")
    result = subprocess.run(
        [sys.executable, "-m", "appmanager", "nginx-config", str(echo_app), "--port", "8123",
         "--run-dir", str(run_dir), "--env-var", "GREETING=hi there", "--max-pool-size", "3",
         "--base-uri", "/sub"],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    conf = run_dir / "nginx.conf"
    conf.write_text(result.stdout)
    assert 'appmanager_env_var "GREETING" "hi there";' in result.stdout
    assert 'appmanager_max_pool_size "3";' in result.stdout
    check = subprocess.run(
        [NGINX, "-t", "-p", str(run_dir), "-c", str(conf)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_start_with_the_nginx_engine_serves_files_and_the_app_over_tls(
    nginx: NginxFactory, echo_app: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    port = free_port()
    cmd = [
        sys.executable, "-m", "appmanager", "start", str(echo_app), "--engine", "nginx",
        "--port", str(port), "--ssl-certificate", str(cert), "--ssl-certificate-key", str(key),
        "--env-var", "GREETING=engine", "--shutdown-timeout", "5",
    ]  # fmt: skip
    if AS_ROOT:
        cmd += ["--user-switching", "off"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Serving"):
                break
        assert lines and lines[-1].startswith("Serving"), "".join(lines)
        engine = psutil.Process(proc.pid)
        family = engine.children(recursive=True)
        tls = NginxServer(Path("/nonexistent"), Path("/nonexistent"), port, tls=True)
        assert tls.get("/static.txt").body == b"from a file\n"
        assert json.loads(tls.get("/env?GREETING").body)["value"] == "engine"
        assert json.loads(tls.get("/x").body)["scheme"] == "https"
        family += engine.children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines) + proc.stdout.read()
        _, alive = psutil.wait_procs(family, timeout=30)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
