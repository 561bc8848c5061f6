"""The core's side of the connector protocol (docs/protocol/connector.md), spoken by the test itself
over the core's socket, as the nginx and Apache modules speak it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import psutil
import pytest

from tests.conftest import APPS, HttpReader, Response, free_port, get

CLIENT = "203.0.113.7 40000 shop.example 443 https"


class CoreUnderTest:
    """One `appmanager core` process on a socket in its instance directory."""

    def __init__(self, tmp_path: Path, *args: str, pass_fds: tuple[int, ...] = ()) -> None:
        tmp_path.mkdir(exist_ok=True)
        self.dir = tmp_path / "instance"
        self.socket = self.dir / "connector.sock"
        self.log_path = tmp_path / "core.log"
        cmd = [
            sys.executable,
            "-m",
            "appmanager",
            "core",
            "--socket",
            str(self.socket),
            "--instance-dir",
            str(self.dir),
            "--log-file",
            str(self.log_path),
            *args,
        ]
        if os.geteuid() == 0:
            cmd += ["--user-switching", "off"]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            pass_fds=pass_fds,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        banner = []
        for line in self.proc.stdout:
            banner.append(line)
            if line.startswith("Serving"):
                self.secret = (self.dir / "connector.sock.secret").read_text().strip()
                return
        self.proc.wait()
        raise AssertionError(f"core did not start: {''.join(banner)}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ask(
        self, sock: socket.socket, reader: HttpReader, *args: str | None, **kw: object
    ) -> Response:
        """One request with this core's secret (see ``ask``)."""
        return ask(sock, reader, *args, secret=self.secret, **kw)  # type: ignore[arg-type]

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(str(self.socket))
        return sock

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code


@pytest.fixture
def core(tmp_path: Path) -> Iterator[CoreUnderTest]:
    server = CoreUnderTest(tmp_path)
    yield server
    server.stop()


def app_field(app: str, **settings: str | list[str]) -> str:
    """An ``!~App`` value for the test app ``app``."""
    pairs: list[tuple[str, str]] = [("app_root", str(APPS / app))]
    for name, value in settings.items():
        for item in value if isinstance(value, list) else [value]:
            pairs.append((name, item))
    return urlencode(pairs)


def ask(
    sock: socket.socket,
    reader: HttpReader,
    path: str,
    app: str | None,
    *,
    secret: str,
    client: str = CLIENT,
    method: str = "GET",
    body: bytes = b"",
    extra: str = "",
) -> Response:
    """One request on a kept-alive connector connection."""
    fields = f"!~App: {app}\r\n!~Client: {client}\r\n!~Secret: {secret}\r\n" if app else ""
    length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    head = f"{method} {path} HTTP/1.1\r\nHost: shop.example\r\n{extra}{fields}{length}\r\n"
    sock.sendall(head.encode("latin-1") + body)
    return reader.read()


def test_app_and_client_fields_reach_the_app_and_nothing_else(core: CoreUnderTest) -> None:
    with core.connect() as sock:
        reader = HttpReader(sock)
        resp = core.ask(
            sock, reader, "/some/path?q=1&r=%20", app_field("wsgi_echo"), body=b"x" * 10
        )
    assert resp.status == 200, resp.body
    environ = json.loads(resp.body)
    assert environ["REMOTE_ADDR"] == "203.0.113.7"
    assert environ["REMOTE_PORT"] == "40000"
    assert environ["SERVER_NAME"] == "shop.example"
    assert environ["SERVER_PORT"] == "443"
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["PATH_INFO"] == "/some/path"
    assert environ["QUERY_STRING"] == "q=1&r=%20"
    assert environ["body"] == "x" * 10
    assert not [key for key in environ if "!~" in key or "~" in key]


def test_one_connection_carries_requests_for_python_ruby_and_node_apps(
    core: CoreUnderTest,
) -> None:
    with core.connect() as sock:
        reader = HttpReader(sock)
        for _ in range(3):
            flask = core.ask(sock, reader, "/", app_field("flask_app"))
            assert flask.status == 200 and b"Hello from Flask" in flask.body
            rack = core.ask(sock, reader, "/conformance?x=1", app_field("echo_rack"), body=b"rb")
            assert rack.status == 200 and json.loads(rack.body)["query"] == "x=1"
            node = core.ask(
                sock, reader, "/n?y=2", app_field("echo_node"), method="POST", body=b"js"
            )
            assert node.status == 200, node.body
            seen = json.loads(node.body)
            assert seen["url"] == "/n?y=2"
            assert seen["body"]["length"] == 2
            assert seen["remoteAddress"] == "203.0.113.7"
            assert seen["headers"]["x-forwarded-proto"] == "https"
            assert not [h for h in seen["headers"] if h.startswith("!~")]


def test_changed_settings_start_new_processes_and_retire_the_old(core: CoreUnderTest) -> None:
    with core.connect() as sock:
        reader = HttpReader(sock)
        first = core.ask(
            sock, reader, "/app/env?GREETING", app_field("wsgi_echo", env_var="GREETING=one")
        )
        assert first.body == b"one"
        old_pid = int(
            core.ask(sock, reader, "/app/pid", app_field("wsgi_echo", env_var="GREETING=one")).body
        )
        changed = app_field("wsgi_echo", env_var="GREETING=two")
        assert core.ask(sock, reader, "/app/env?GREETING", changed).body == b"two"
        assert int(core.ask(sock, reader, "/app/pid", changed).body) != old_pid
    deadline = time.monotonic() + 15
    while psutil.pid_exists(old_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not psutil.pid_exists(old_pid)
    assert "settings changed; new processes take its requests" in core.log()


@pytest.mark.parametrize(
    ("app", "named"),
    [
        (app_field("wsgi_echo", min_instances="-1"), "min_instances"),
        (app_field("wsgi_echo", spawn_method="sometimes"), "spawn_method"),
        (app_field("wsgi_echo", address="0.0.0.0"), "address"),
        ("app_root=relative%2Fpath", "app_root"),
        (app_field("no_app"), "app_root"),
    ],
)
def test_a_bad_app_field_is_answered_500_naming_the_setting(
    core: CoreUnderTest, app: str, named: str
) -> None:
    with core.connect() as sock:
        reader = HttpReader(sock)
        resp = core.ask(sock, reader, "/", app)
        assert resp.status == 500
        assert named.encode() in resp.body
        # The connection stays usable for the next request.
        assert core.ask(sock, reader, "/", app_field("flask_app")).status == 200


@pytest.mark.parametrize("secret", ["", "0" * 32])
def test_connector_fields_without_the_secret_are_refused(core: CoreUnderTest, secret: str) -> None:
    with core.connect() as sock:
        resp = ask(sock, HttpReader(sock), "/", app_field("flask_app"), secret=secret)
    assert resp.status == 403
    assert "without the core's secret" in core.log()
    secret_file = core.dir / "connector.sock.secret"
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600


def test_a_request_without_app_field_finds_no_app(core: CoreUnderTest) -> None:
    with core.connect() as sock:
        resp = core.ask(sock, HttpReader(sock), "/", None)
    assert resp.status == 404


def test_connector_fields_over_tcp_are_removed_and_ignored(server_factory: object) -> None:
    server = server_factory(APPS / "wsgi_echo")  # type: ignore[operator]
    forged = f"!~App: {app_field('flask_app')}\r\n!~Client: {CLIENT}\r\n!~Other: x\r\n"
    resp = get(server.port, "/", headers=forged)
    assert resp.status == 200
    environ = json.loads(resp.body)
    assert environ["REMOTE_ADDR"] == "127.0.0.1"
    assert environ["wsgi.url_scheme"] == "http"
    assert not [key for key in environ if "~" in key]


def test_socket_and_instance_directory_permissions(core: CoreUnderTest) -> None:
    def mode(path: Path) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    assert mode(core.dir) == 0o711
    assert mode(core.socket) == 0o666
    assert mode(core.dir / "control.sock") == 0o600
    assert mode(core.dir / "events.sock") == 0o600
    assert mode(core.dir / "core.json") == 0o600
    assert mode(core.dir / "spool") == 0o700


PEER = """
import socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(20)
sock.connect(sys.argv[1])
fields = "!~App: %s\\r\\n!~Secret: %s\\r\\n" % (sys.argv[2], sys.argv[3])
try:
    # Refused at once: the send may fail, or the read find the connection closed.
    sock.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n" + fields.encode() + b"\\r\\n")
    data = sock.recv(100)
except (BrokenPipeError, ConnectionResetError):
    data = b""
print(data[:12].decode() or "closed")
"""


def _as_nobody(core: CoreUnderTest) -> str:
    result = subprocess.run(
        ["/usr/bin/python3", "-c", PEER, str(core.socket), app_field("flask_app"), core.secret],
        user="nobody",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_only_the_connector_user_may_connect(tmp_path: Path) -> None:
    # pytest's directories are private to root: the socket must be reachable by another user.
    base = Path(tempfile.mkdtemp(prefix="appmanager-test-"))
    base.chmod(0o755)
    try:
        _check_peers(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _check_peers(tmp_path: Path) -> None:
    core = CoreUnderTest(tmp_path / "a")
    try:
        assert _as_nobody(core) == "closed"
        assert "refused a connection" in core.log()
    finally:
        core.stop()
    allowed = CoreUnderTest(tmp_path / "b", "--connector-user", "nobody")
    try:
        assert _as_nobody(allowed) == "HTTP/1.1 200"
    finally:
        allowed.stop()


def test_the_core_stops_when_its_lifeline_closes(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    core = CoreUnderTest(
        tmp_path, "--lifeline-fd", str(read_end), "--min-instances", "1", pass_fds=(read_end,)
    )
    os.close(read_end)
    with core.connect() as sock:
        assert core.ask(sock, HttpReader(sock), "/", app_field("flask_app")).status == 200
    apps = psutil.Process(core.proc.pid).children(recursive=True)
    assert apps
    os.close(write_end)
    assert core.proc.wait(30) == 0
    assert "the web server that started the core has exited; stopping" in core.log()
    gone, alive = psutil.wait_procs(apps, timeout=10)
    assert not alive
    assert not core.dir.exists()  # created for the core: removed with it
    core.stop()


def test_pre_start_boots_the_app_before_any_visitor(server_factory: object) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/app/pid"
    server = server_factory(  # type: ignore[operator]
        APPS / "wsgi_echo", "--min-instances", "0", "--pre-start", url, "--port", str(port)
    )
    server.wait_for_log(f"pre_start {url}: 200")
    deadline = time.monotonic() + 10
    while not server.app_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.app_processes()
