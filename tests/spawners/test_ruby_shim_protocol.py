"""The Ruby shim driven over its real protocols (docs/protocol/spawn.md, handoff.md).

The test plays the core: it starts ``ruby spawners/ruby/appmanager_ruby.rb`` with the control
channel on fd 3 and the progress file on fd 4, does the handshake, and hands it real loopback TCP
connections by SCM_RIGHTS. The client's end reads the response the shim writes straight to it.
Most requests go to ``tests/apps/echo_rack``; Sinatra and Rails load through their config.ru.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from python_shim import (
    Connection,
    Result,
    WholeConnections,
    http_head,
    parse_response,
    split_done,
)

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / "spawners" / "ruby" / "appmanager_ruby.rb"
APPS = ROOT / "tests" / "apps"
ECHO_RACK = APPS / "echo_rack"
RUBY = shutil.which("ruby")
TIMEOUT = 10.0
# The seq of the Q path, then an 8-byte slot per connection: the file the core gives a process
# that takes whole connections.
CONNECTIONS_PROGRESS_SIZE = 8 + 8 * 65536

pytestmark = pytest.mark.skipif(RUBY is None, reason="no ruby interpreter on PATH")


@functools.cache
def ruby_can_require(library: str) -> bool:
    """Whether the installed Ruby has ``library``; framework tests skip only when it is absent."""
    if RUBY is None:
        return False
    probe = subprocess.run([RUBY, "-e", f"require {library!r}"], capture_output=True)
    return probe.returncode == 0


def need(library: str) -> None:
    if not ruby_can_require(library):
        pytest.skip(f"ruby cannot require {library!r}")


def route(path: str, *headers: tuple[str, str], **kwargs: Any) -> bytes:
    """A request for one of the echo app's /app/ routes."""
    return http_head(f"/app/{path}", *headers, **kwargs)


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[str, bytes]:
    """A multipart/form-data body, as a browser sends a form with file inputs."""
    boundary = f"----appmanager{uuid.uuid4().hex}"
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, (filename, data) in files.items():
        parts.append(
            f"--{boundary}\r\nContent-Disposition: form-data; "
            f'name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


@dataclass
class Shim(WholeConnections):
    """A running shim process and the core's ends of its channels."""

    process: subprocess.Popen[bytes]
    control: socket.socket
    progress_path: Path
    log_path: Path
    listener: socket.socket
    seq: int = 0
    connections: list[Connection] = field(default_factory=list)
    # Every D reply as it came, access log fields included (send and wait_done return them
    # without).
    replies: list[str] = field(default_factory=list)

    def handshake(self, **overrides: Any) -> tuple[str, dict[str, Any]]:
        """Sends SPAWN; returns the answer's tag and payload."""
        config = {"protocol": 1, "app_type": "rack", "environment": "production"}
        config.update(overrides)
        self.control.send(b"SPAWN " + json.dumps(config).encode())
        tag, _, payload = self.control.recv(1 << 20).partition(b" ")
        return tag.decode(), json.loads(payload)

    def connect(self) -> Connection:
        connection = Connection(self.listener)
        self.connections.append(connection)
        return connection

    def start_request(
        self,
        connection: Connection,
        head: bytes,
        body: bytes = b"",
        *,
        flags: str = "K",
        body_fd: int | None = None,
        scheme: str = "http",
    ) -> None:
        """Sends one Q message with the connection's descriptor, and the body file's if any."""
        self.seq += 1
        fds = [connection.server.fileno()]
        inline = body
        if body_fd is not None:
            flags = flags.replace("-", "") + "F"
            fds.append(body_fd)
            inline = b""
        line = (
            f"Q {self.seq} {flags or '-'} 192.0.2.7 54321 127.0.0.1 8000 {scheme} "
            f"{len(head)} {len(body)}\n"
        ).encode()
        socket.send_fds(self.control, [line + head + inline], fds)

    def send(
        self,
        connection: Connection,
        head: bytes,
        body: bytes = b"",
        *,
        flags: str = "K",
        body_file: Path | None = None,
        scheme: str = "http",
    ) -> str:
        """Hands one request to the shim; returns its D reply once the response is written."""
        body_fd = None
        if body_file is not None:
            body_fd = os.open(body_file, os.O_RDWR)
            # Like the core after writing it: the shared offset is at the end, not at 0.
            os.lseek(body_fd, 0, os.SEEK_END)
        try:
            self.start_request(connection, head, body, flags=flags, body_fd=body_fd, scheme=scheme)
            done = self.wait_done(connection)
            if body_fd is not None and body_file is not None:
                assert os.lseek(body_fd, 0, os.SEEK_CUR) == body_file.stat().st_size
        finally:
            if body_fd is not None:
                os.close(body_fd)
        return done

    def last_done(self) -> tuple[str, int | None, int | None]:
        """The last D reply, split: ``D <seq> <k|c>``, status and body size (None: not sent)."""
        return split_done(self.replies[-1])

    def wait_done(self, connection: Connection) -> str:
        """Reads the client's end while waiting for the D reply, so big responses cannot stall;
        returns it as ``D <seq> <k|c>`` (all of it is kept in ``replies``)."""
        deadline = time.monotonic() + TIMEOUT
        readable = [self.control]
        if connection.client.fileno() != -1:
            readable.append(connection.client)
        while time.monotonic() < deadline:
            ready, _, _ = select.select(readable, [], [], 0.5)
            if connection.client in ready:
                connection.pump()
            if self.control in ready:
                reply = self.control.recv(1 << 16).decode()
                self.replies.append(reply)
                return split_done(reply)[0]
        raise AssertionError(f"no D reply within {TIMEOUT} s; log:\n{self.log()}")

    def request(
        self,
        head: bytes,
        body: bytes = b"",
        *,
        flags: str = "K",
        body_file: Path | None = None,
        scheme: str = "http",
    ) -> Result:
        """One request on a fresh connection; the response is read after the core's end closes.
        The D reply's status and body size must be those the client read."""
        connection = self.connect()
        done = self.send(connection, head, body, flags=flags, body_file=body_file, scheme=scheme)
        _, status, size = self.last_done()
        raw = connection.finish()
        response, rest = parse_response(raw, head_request=head.startswith(b"HEAD "))
        assert rest == b"", f"bytes after the response: {rest[:100]!r}"
        assert (status, size) == (response.status, len(response.body)), (
            f"D reply {self.replies[-1]!r} for a {response.status} response of "
            f"{len(response.body)} body bytes"
        )
        return Result(done, response, raw, status, size)

    def progress(self) -> int:
        value: int = struct.unpack("<Q", self.progress_path.read_bytes()[:8])[0]
        return value

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        for connection in self.connections:
            connection.close()
        self.control.close()
        self.listener.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(TIMEOUT)


def start_shim(directory: Path, log_dir: Path, progress_size: int = 8, **env_vars: str) -> Shim:
    """Starts the shim the way the core does: fds 3 and 4, its own session, app root as cwd.
    The progress file holds the seq of the Q path, and ``progress_size`` makes room for the
    slots of whole connections (handoff.md) too."""
    assert RUBY is not None
    core_end, shim_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    core_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    progress_path = log_dir / "progress"
    progress_path.write_bytes(bytes(progress_size))
    progress_fd = os.open(progress_path, os.O_RDWR | os.O_CLOEXEC)
    log_path = log_dir / "shim.log"
    control_fd = shim_end.fileno()

    def channels_on_3_and_4() -> None:
        # Copies above 4 first, so that neither dup2 overwrites the other's source.
        control_copy = fcntl.fcntl(control_fd, fcntl.F_DUPFD_CLOEXEC, 10)
        progress_copy = fcntl.fcntl(progress_fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.dup2(control_copy, 3)
        os.dup2(progress_copy, 4)
        # What close_fds would do, had it not closed 3 and 4 as well: the shim gets 0 to 4 only.
        for name in os.listdir("/proc/self/fd"):
            if int(name) > 4:
                try:
                    os.set_inheritable(int(name), False)
                except OSError:
                    pass  # the listing's own descriptor, closed by now

    env = {key: value for key, value in os.environ.items() if not key.startswith("APPMANAGER_")}
    for name in ("RACK_ENV", "RAILS_ENV", "BUNDLE_GEMFILE"):
        env.pop(name, None)
    env.update(
        APPMANAGER_CONTROL_FD="3",
        APPMANAGER_PROGRESS_FD="4",
        APPMANAGER_ENV="production",
        RACK_ENV="production",
        RAILS_ENV="production",
        **env_vars,
    )
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [RUBY, str(SHIM)],
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # close_fds would close 3 and 4 after preexec_fn, so preexec_fn does its work.
            close_fds=False,
            preexec_fn=channels_on_3_and_4,
            start_new_session=True,
        )
    shim_end.close()
    os.close(progress_fd)
    core_end.settimeout(TIMEOUT)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    return Shim(process, core_end, progress_path, log_path, listener)


def start_app(app_root: Path, log_dir: Path, progress_size: int = 8, **config: Any) -> Shim:
    """Starts a shim on an existing app directory and requires it to answer READY."""
    shim = start_shim(app_root, log_dir, progress_size, **config.pop("env", {}))
    try:
        tag, payload = shim.handshake(
            app_root=str(app_root), startup_file=str(app_root / "config.ru"), **config
        )
        assert tag == "READY", f"{payload}\n{shim.log()}"
    except BaseException:
        shim.stop()
        raise
    return shim


def start_rack_echo(log_dir: Path, **config: Any) -> Shim:
    """A shim on apps/echo_rack that answered READY, its log and progress file in a new
    ``log_dir``, the progress file with room for the slots of whole connections."""
    log_dir.mkdir()
    return start_app(ECHO_RACK, log_dir, progress_size=CONNECTIONS_PROGRESS_SIZE, **config)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Starts shims on app files written under tmp_path; stops every one of them afterwards."""
    shims: list[Shim] = []

    def spawn(
        files: dict[str, str], startup: str = "config.ru", **config: Any
    ) -> tuple[Shim, str, dict[str, Any]]:
        root = tmp_path / f"app{len(shims)}"
        root.mkdir()
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(textwrap.dedent(text))
        shim = start_shim(root, root)
        shims.append(shim)
        config = {"app_root": str(root), "startup_file": str(root / startup), **config}
        tag, payload = shim.handshake(**config)
        return shim, tag, payload

    try:
        yield spawn
    finally:
        for shim in shims:
            shim.stop()


@pytest.fixture(scope="module")
def close_marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("marker") / "closed"


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory, close_marker: Path) -> Iterator[Shim]:
    """One shim on apps/echo_rack, shared by the tests that only send requests."""
    shim = start_app(
        APPS / "echo_rack",
        tmp_path_factory.mktemp("echo"),
        env={"ECHO_CLOSE_MARKER": str(close_marker)},
    )
    try:
        yield shim
    finally:
        shim.stop()


HELLO_APP = """
    run ->(env) { [200, { "Content-Type" => "text/plain" }, ["hello from config.ru"]] }
"""


# The handshake


def test_ready_names_the_pid_and_concurrency(spawn: Any) -> None:
    shim, tag, payload = spawn({"config.ru": HELLO_APP})
    assert tag == "READY"
    assert payload == {
        "pid": shim.process.pid,
        "concurrency": 1,
        "connections": True,
        "protocol": 1,
    }
    assert shim.request(http_head()).response.body == b"hello from config.ru"


def test_load_error_fails_load_app_with_the_backtrace(spawn: Any) -> None:
    app = 'require "no_such_library_for_appmanager_tests"\nrun ->(env) { [200, {}, []] }\n'
    shim, tag, payload = spawn({"config.ru": app})
    assert tag == "ERROR"
    assert payload["step"] == "LOAD_APP"
    assert payload["message"] == (
        "LoadError: cannot load such file -- no_such_library_for_appmanager_tests"
    )
    assert "config.ru:1" in payload["traceback"]
    assert shim.process.wait(TIMEOUT) == 1


def test_syntax_error_fails_load_app(spawn: Any) -> None:
    shim, tag, payload = spawn({"config.ru": "run ->(env) { [200, {}, [] }\n"})
    assert (tag, payload["step"]) == ("ERROR", "LOAD_APP")
    assert payload["message"].startswith("SyntaxError: ")
    assert shim.process.wait(TIMEOUT) == 1


def test_config_ru_without_run_fails_load_app(spawn: Any) -> None:
    shim, tag, payload = spawn({"config.ru": "x = 1\n"})
    assert (tag, payload["step"]) == ("ERROR", "LOAD_APP")
    assert "missing run or map statement" in payload["message"]
    assert shim.process.wait(TIMEOUT) == 1


def test_exit_while_loading_fails_load_app(spawn: Any) -> None:
    shim, tag, payload = spawn({"config.ru": "exit 3\n"})
    assert (tag, payload["step"]) == ("ERROR", "LOAD_APP")
    assert payload["message"] == "SystemExit: exit status 3"
    assert shim.process.wait(TIMEOUT) == 1


def test_unknown_protocol_version_fails_prepare(spawn: Any) -> None:
    shim, tag, payload = spawn({"config.ru": HELLO_APP}, protocol=2)
    assert (tag, payload["step"]) == ("ERROR", "PREPARE")
    assert "protocol 2" in payload["message"]
    assert shim.process.wait(TIMEOUT) == 1


def test_another_app_type_fails_prepare(spawn: Any) -> None:
    shim, tag, payload = spawn({"config.ru": HELLO_APP}, app_type="wsgi")
    assert (tag, payload["step"]) == ("ERROR", "PREPARE")
    assert '"wsgi"' in payload["message"]
    assert shim.process.wait(TIMEOUT) == 1


def test_a_spawn_message_that_is_not_json_fails_prepare(tmp_path: Path) -> None:
    shim = start_shim(tmp_path, tmp_path)
    try:
        shim.control.send(b"SPAWN {not json")
        tag, _, payload = shim.control.recv(1 << 20).partition(b" ")
        assert (tag, json.loads(payload)["step"]) == (b"ERROR", "PREPARE")
        assert shim.process.wait(TIMEOUT) == 1
    finally:
        shim.stop()


def test_an_app_root_with_non_ascii_characters(tmp_path: Path) -> None:
    # The SPAWN JSON escapes them (\u00e9, surrogate pairs); the shim reads it without the json gem.
    root = tmp_path / "caf\u00e9 \U0001f600"
    root.mkdir()
    (root / "config.ru").write_text("run ->(env) { [200, {}, [Dir.pwd]] }\n")
    shim = start_app(root, tmp_path)
    try:
        assert shim.request(http_head()).response.body == str(root).encode()
    finally:
        shim.stop()


def test_config_ru_loads_its_neighbours(spawn: Any) -> None:
    files = {
        "lib/greeting.rb": "GREETING = 'from the load path'\n",
        "helper.rb": "HELPER = 'from require_relative'\n",
        "config.ru": """
            require_relative "helper"
            require "lib/greeting"
            run ->(env) { [200, {}, ["#{HELPER}, #{GREETING}, #{Dir.pwd}"]] }
        """,
    }
    shim, tag, payload = spawn(files)
    assert tag == "READY", payload
    body = shim.request(http_head()).response.body.decode()
    assert body == f"from require_relative, from the load path, {shim.log_path.parent}"


def test_rack_builder_middleware_and_map_work(spawn: Any) -> None:
    app = """
        class Shout
          def initialize(app) = @app = app
          def call(env)
            status, headers, body = @app.call(env)
            [status, headers.merge("X-Shout" => "yes"), body.map(&:upcase)]
          end
        end
        use Shout
        map "/mounted" do
          run ->(env) { [200, {}, ["#{env["SCRIPT_NAME"]}|#{env["PATH_INFO"]}"]] }
        end
        run ->(env) { [200, {}, ["root"]] }
    """
    shim, tag, payload = spawn({"config.ru": app})
    assert tag == "READY", payload
    result = shim.request(http_head("/mounted/x"))
    assert result.response.body == b"/MOUNTED|/X"
    assert result.response.header("X-Shout") == "yes"


BUNDLED_APP = """
    # What was loaded before config.ru: nothing that the bundle could pin to another version.
    before = $LOADED_FEATURES.grep(%r{/(json|stringio)\\.(rb|so)\\z})
    run ->(env) { [200, {}, ["#{defined?(Bundler::Runtime) ? "bundled" : "plain"} #{before}"]] }
"""


def test_a_gemfile_sets_up_the_bundle_before_config_ru(spawn: Any) -> None:
    need("bundler")
    files = {"Gemfile": 'source "https://rubygems.org"\ngem "rack"\n', "config.ru": BUNDLED_APP}
    shim, tag, payload = spawn(files)
    assert tag == "READY", payload
    assert shim.request(http_head()).response.body == b"bundled []"


def test_no_gemfile_no_bundler(spawn: Any) -> None:
    shim, tag, payload = spawn({"config.ru": BUNDLED_APP})
    assert tag == "READY", payload
    assert shim.request(http_head()).response.body == b"plain []"


def test_a_gem_missing_from_the_bundle_fails_load_app(spawn: Any) -> None:
    need("bundler")
    gemfile = 'source "https://rubygems.org"\ngem "no_such_gem_for_appmanager_tests"\n'
    shim, tag, payload = spawn({"Gemfile": gemfile, "config.ru": HELLO_APP})
    assert (tag, payload["step"]) == ("ERROR", "LOAD_APP")
    assert payload["message"].startswith("Bundler::GemNotFound: Could not find gem")
    assert "no_such_gem_for_appmanager_tests" in payload["message"]
    assert shim.process.wait(TIMEOUT) == 1


def test_app_output_reaches_the_log(echo: Shim) -> None:
    echo.request(route("print"))
    log = echo.log()
    assert "echo app loaded" in log
    assert "hello from the app's stdout" in log
    assert "and its stderr" in log
    assert "rack.errors line" in log


# Process lifetime


def test_eof_on_the_control_channel_exits_0(spawn: Any) -> None:
    shim, tag, _ = spawn({"config.ru": HELLO_APP})
    assert tag == "READY"
    shim.control.close()
    assert shim.process.wait(TIMEOUT) == 0


def test_sigterm_while_idle_exits_0_promptly(spawn: Any) -> None:
    shim, tag, _ = spawn({"config.ru": HELLO_APP})
    assert tag == "READY"
    started = time.monotonic()
    shim.process.send_signal(signal.SIGTERM)
    assert shim.process.wait(TIMEOUT) == 0
    assert time.monotonic() - started < 2


def test_sigterm_during_a_request_finishes_it_first(tmp_path: Path) -> None:
    shim = start_app(APPS / "echo_rack", tmp_path)
    try:
        marker = tmp_path / "slow-started"
        connection = shim.connect()
        shim.start_request(connection, route("slow", ("X-Marker", str(marker))))
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        shim.process.send_signal(signal.SIGTERM)
        assert shim.wait_done(connection) == f"D {shim.seq} k"
        response, _ = parse_response(connection.finish())
        assert response.body == b"finished"
        assert shim.process.wait(TIMEOUT) == 0
    finally:
        shim.stop()


def test_sigint_is_ignored(echo: Shim) -> None:
    echo.process.send_signal(signal.SIGINT)
    assert echo.request(http_head()).done.endswith(" k")
    assert echo.process.poll() is None


def test_a_crash_leaves_the_progress_of_the_last_response(tmp_path: Path) -> None:
    shim = start_app(APPS / "echo_rack", tmp_path)
    try:
        shim.request(http_head())
        answered = shim.seq
        connection = shim.connect()
        shim.start_request(connection, route("crash"))
        assert shim.process.wait(TIMEOUT) == 7
        # Nothing of the crashed request reached the client: the core would answer 502.
        assert shim.progress() == answered
        assert connection.finish() == b""
    finally:
        shim.stop()


def test_no_descriptor_leaks_into_subprocesses_of_the_app(echo: Shim) -> None:
    # The control channel, the progress file and the client connection are all close-on-exec.
    assert echo.request(route("inheritable-fds")).response.json() == []


def test_a_malformed_message_reports_c_and_the_process_goes_on(echo: Shim) -> None:
    connection = echo.connect()
    echo.seq += 1
    head = http_head()
    line = f"Q {echo.seq} K 127.0.0.1 1 127.0.0.1 2 http {len(head) + 5} 0\n".encode()
    socket.send_fds(echo.control, [line + head], [connection.server.fileno()])
    assert echo.wait_done(connection) == f"D {echo.seq} c"
    assert connection.finish() == b""
    assert "protocol error" in echo.log()
    assert echo.request(http_head()).response.status == 200


def test_a_message_over_the_size_limit_is_a_protocol_error(echo: Shim) -> None:
    # Bodies over 64 KiB always come as a file (handoff.md); an inline one that big is refused.
    connection = echo.connect()
    assert echo.send(connection, http_head("/", method="POST"), b"x" * 200_000) == f"D {echo.seq} c"
    assert connection.finish() == b""
    assert "truncated" in echo.log()
    assert echo.request(http_head()).response.status == 200


# The Rack env


def test_env_has_every_rack_key(echo: Shim) -> None:
    head = http_head("/some/path?a=1&b=%20", ("Content-Type", "text/plain"), method="POST")
    result = echo.request(head, b"hello", scheme="https")
    env = result.response.json()
    assert result.done == f"D {echo.seq} k"
    assert env["REQUEST_METHOD"] == "POST"
    assert env["SCRIPT_NAME"] == ""
    assert env["PATH_INFO"] == "/some/path"
    assert env["QUERY_STRING"] == "a=1&b=%20"
    assert env["REQUEST_URI"] == "/some/path?a=1&b=%20"
    assert env["CONTENT_TYPE"] == "text/plain"
    assert env["CONTENT_LENGTH"] == "5"
    # From the message, not from Host: Rack::Request reads HTTP_HOST first anyway.
    assert env["SERVER_NAME"] == "127.0.0.1"
    assert env["SERVER_PORT"] == "8000"
    assert env["HTTP_HOST"] == "example.test:8080"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["REMOTE_ADDR"] == "192.0.2.7"
    assert env["REMOTE_PORT"] == "54321"
    assert env["SERVER_SOFTWARE"] == "appmanager"
    assert env["rack.url_scheme"] == "https"
    assert env["rack.version"] == [1, 3]
    assert env["rack.multithread"] is False
    assert env["rack.multiprocess"] is True
    assert env["rack.run_once"] is False
    assert env["rack.hijack?"] is False
    assert env["rack.errors_is_stderr"] is True
    assert env["rack.input.class"] == "StringIO"
    assert env["body"] == "hello"
    assert "HTTP_CONTENT_TYPE" not in env
    assert "HTTP_CONTENT_LENGTH" not in env


def test_rack_lint_accepts_the_env_and_the_response(echo: Shim, tmp_path: Path) -> None:
    env = echo.request(http_head("/lint/x?y=1")).response.json()
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/lint", "/x")
    body = b"a line\n" * 20_000
    path = tmp_path / "body"
    path.write_bytes(body)
    for how in ("read", "gets", "each", "read-n"):
        head = http_head("/lint", ("X-Read", how), method="PUT")
        result = echo.request(head, body, body_file=path)
        assert result.response.status == 200, result.response.body[:2000]
        assert result.response.json()["body_info"]["length"] == len(body)


def test_path_info_is_not_percent_decoded(echo: Shim) -> None:
    env = echo.request(http_head("/caf%C3%A9/a%2Fb?q=caf%C3%A9")).response.json()
    assert env["PATH_INFO"] == "/caf%C3%A9/a%2Fb"
    assert env["QUERY_STRING"] == "q=caf%C3%A9"


def test_absolute_form_target_keeps_the_path(echo: Shim) -> None:
    env = echo.request(http_head("http://other.test/p/q?r=1")).response.json()
    assert (env["PATH_INFO"], env["QUERY_STRING"]) == ("/p/q", "r=1")


def test_repeated_headers_are_joined(echo: Shim) -> None:
    head = http_head(
        "/",
        ("X-Multi", "a"),
        ("Cookie", "one=1"),
        ("x-multi", "b"),
        ("Cookie", "two=2"),
    )
    env = echo.request(head).response.json()
    assert env["HTTP_X_MULTI"] == "a, b"
    assert env["HTTP_COOKIE"] == "one=1; two=2"


def test_headers_with_underscores_are_dropped(echo: Shim) -> None:
    head = http_head("/", ("X-Forwarded-For", "10.0.0.1"), ("X_Forwarded_For", "6.6.6.6"))
    env = echo.request(head).response.json()
    assert env["HTTP_X_FORWARDED_FOR"] == "10.0.0.1"


def test_header_values_are_bytes_as_sent(echo: Shim) -> None:
    head = http_head("/", ("X-Latin", "caf\u00e9"))  # one byte, 0xE9, as latin-1
    assert echo.request(head).response.json()["HTTP_X_LATIN"] == "caf\u00e9"


def test_chunked_request_gets_content_length_and_no_transfer_encoding(echo: Shim) -> None:
    head = http_head("/", ("Transfer-Encoding", "chunked"), method="POST")
    env = echo.request(head, b"de-chunked body").response.json()
    assert env["CONTENT_LENGTH"] == "15"
    assert "HTTP_TRANSFER_ENCODING" not in env
    assert env["body"] == "de-chunked body"


def test_content_length_comes_from_body_len_not_the_head(echo: Shim) -> None:
    env = echo.request(http_head("/", ("Content-Length", "999"), method="POST"), b"abc")
    assert env.response.json()["CONTENT_LENGTH"] == "3"


def test_no_content_length_without_a_body(echo: Shim) -> None:
    env = echo.request(http_head()).response.json()
    assert "CONTENT_LENGTH" not in env
    assert env["body_info"]["length"] == 0
    post = echo.request(http_head("/", ("Content-Length", "0"), method="POST")).response.json()
    assert post["CONTENT_LENGTH"] == "0"


def test_base_uri_is_script_name_and_leaves_path_info(spawn: Any) -> None:
    app = 'run ->(env) { [200, {}, ["#{env["SCRIPT_NAME"]}|#{env["PATH_INFO"]}"]] }\n'
    shim, tag, _ = spawn({"config.ru": app}, base_uri="/sub/")
    assert tag == "READY"
    assert shim.request(http_head("/sub/page?x=1")).response.body == b"/sub|/page"
    assert shim.request(http_head("/sub")).response.body == b"/sub|"
    assert shim.request(http_head("/subway")).response.body == b"/sub|/subway"


# rack.input


@pytest.mark.parametrize(
    ("how", "pieces"),
    [("read", 1), ("read-n", 3), ("read-buffer", 3), ("gets", 3), ("each", 3)],
)
def test_inline_body(echo: Shim, how: str, pieces: int) -> None:
    body = b"first line\nsecond line\n" + b"x" * 2000
    head = http_head("/", ("X-Read", how), method="POST")
    info = echo.request(head, body).response.json()["body_info"]
    assert info["sha256"] == hashlib.sha256(body).hexdigest()
    assert info["pieces"] == pieces
    assert info["after"] == 0
    assert info["encoding"] == "ASCII-8BIT"
    assert info["rewound"] is True


def test_largest_inline_body(echo: Shim) -> None:
    body = os.urandom(64 * 1024)
    info = echo.request(http_head("/", method="POST"), body).response.json()["body_info"]
    assert info["sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("how", ["read", "read-n", "read-buffer", "gets", "each"])
def test_body_in_a_file_is_read_from_offset_0_and_never_past_body_len(
    echo: Shim, tmp_path: Path, how: str
) -> None:
    body = b"".join(b"line %07d %s\n" % (i, b"y" * 80) for i in range(22_000))
    assert len(body) > 2_000_000
    path = tmp_path / "body"
    # Bytes past body_len must never be read.
    path.write_bytes(body + b"NOT PART OF THE BODY")
    head = http_head("/", ("X-Read", how), method="POST")
    result = echo.request(head, body, body_file=path)
    env = result.response.json()
    info = env["body_info"]
    assert result.done == f"D {echo.seq} k"
    assert env["CONTENT_LENGTH"] == str(len(body))
    assert env["rack.input.class"] != "StringIO"
    assert info["length"] == len(body)
    assert info["sha256"] == hashlib.sha256(body).hexdigest()
    assert info["after"] == 0
    assert info["encoding"] == "ASCII-8BIT"
    assert info["rewound"] is True
    if how in ("gets", "each"):
        assert info["pieces"] == 22_000
        assert info["first"][0] == "line 0000000 " + "y" * 80 + "\n"


def test_a_body_file_without_a_final_newline(echo: Shim, tmp_path: Path) -> None:
    body = b"z" * 200_000 + b"\n" + b"tail without newline"
    path = tmp_path / "body"
    path.write_bytes(body)
    head = http_head("/", ("X-Read", "gets"), method="POST")
    info = echo.request(head, body, body_file=path).response.json()["body_info"]
    assert info["pieces"] == 2
    assert info["sha256"] == hashlib.sha256(body).hexdigest()


# Responses


def test_array_body_gets_content_length_and_keep_alive(echo: Shim) -> None:
    result = echo.request(route("hello"))
    response = result.response
    assert result.done == f"D {echo.seq} k"
    assert (response.status, response.reason) == (200, "OK")
    assert response.body == b"hello world"
    assert response.header("Content-Length") == "11"
    assert response.header("Content-Type") == "text/plain"
    assert response.header("Connection") is None
    assert (response.header("Date") or "").endswith(" GMT")


def test_progress_file_holds_the_seq_of_the_last_response(echo: Shim) -> None:
    echo.request(http_head())
    assert echo.progress() == echo.seq
    echo.request(route("stream"))
    assert echo.progress() == echo.seq


def test_each_body_is_chunked_on_http_1_1(echo: Shim) -> None:
    result = echo.request(route("stream"))
    assert result.done == f"D {echo.seq} k"
    assert result.response.chunked
    assert result.response.body == b"line 0\nline 1\nline 2\n"
    # An empty chunk from the app must not end the chunked body early.
    assert result.raw.endswith(b"7\r\nline 2\n\r\n0\r\n\r\n")


def test_each_body_is_close_delimited_on_http_1_0(echo: Shim) -> None:
    result = echo.request(route("stream", version="HTTP/1.0"))
    assert result.done == f"D {echo.seq} c"
    assert not result.response.chunked
    assert result.response.header("Connection") == "close"
    assert result.response.body == b"line 0\nline 1\nline 2\n"


def test_streamed_chunks_reach_the_client_as_they_come(echo: Shim) -> None:
    connection = echo.connect()
    echo.start_request(connection, route("slow-stream"))
    first = connection.client.recv(1 << 16)
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    assert first.endswith(b"4\r\none;\r\n")
    assert echo.wait_done(connection) == f"D {echo.seq} k"
    connection.finish()


def test_rack_3_streaming_body(echo: Shim) -> None:
    result = echo.request(route("call"))
    assert result.done == f"D {echo.seq} k"
    assert result.response.chunked
    assert result.response.body == b"streamed by call"


def test_http_1_0_keep_alive_with_a_known_length(echo: Shim) -> None:
    result = echo.request(http_head("/", ("Connection", "keep-alive"), version="HTTP/1.0"))
    assert result.done == f"D {echo.seq} k"
    assert result.response.header("Connection") == "keep-alive"
    assert result.response.json()["SERVER_PROTOCOL"] == "HTTP/1.0"


def test_http_1_0_without_keep_alive_closes(echo: Shim) -> None:
    result = echo.request(http_head(version="HTTP/1.0"))
    assert result.done == f"D {echo.seq} c"
    assert result.response.header("Connection") == "close"


def test_connection_close_from_the_client(echo: Shim) -> None:
    result = echo.request(http_head("/", ("Connection", "Upgrade, close")))
    assert result.done == f"D {echo.seq} c"
    assert result.response.header("Connection") == "close"


def test_no_k_flag_closes(echo: Shim) -> None:
    result = echo.request(http_head(), flags="-")
    assert result.done == f"D {echo.seq} c"
    assert result.response.header("Connection") == "close"


def test_upgrade_flag_closes(echo: Shim) -> None:
    result = echo.request(http_head("/", ("Upgrade", "websocket")), flags="KU")
    assert result.done == f"D {echo.seq} c"
    assert result.response.status == 200


def test_connection_close_from_the_app(echo: Shim) -> None:
    result = echo.request(route("connection-close"))
    assert result.done == f"D {echo.seq} c"
    assert result.response.header("Connection") == "close"
    assert result.response.body == b"ok"


def test_hop_by_hop_headers_from_the_app_are_dropped(echo: Shim) -> None:
    result = echo.request(route("hop-by-hop"))
    assert result.done == f"D {echo.seq} k"
    assert result.response.header("Keep-Alive") is None
    assert result.response.header("Transfer-Encoding") is None
    assert result.response.header("Content-Length") == "2"
    assert result.response.header("Date") == "app's"


def test_streamed_body_with_the_apps_content_length_is_not_chunked(echo: Shim) -> None:
    result = echo.request(route("stream-length"))
    assert result.done == f"D {echo.seq} k"
    assert not result.response.chunked
    assert result.response.header("Content-Length") == "10"
    assert result.response.body == b"0123456789"


def test_head_sends_the_headers_only(echo: Shim) -> None:
    result = echo.request(route("hello", method="HEAD"))
    assert result.done == f"D {echo.seq} k"
    assert result.raw.endswith(b"\r\n\r\n")
    assert result.response.header("Content-Length") == str(len(b"hello world"))
    streamed = echo.request(route("stream", method="HEAD"))
    assert streamed.done == f"D {echo.seq} k"
    assert streamed.raw.endswith(b"\r\n\r\n")
    assert streamed.response.header("Transfer-Encoding") is None


@pytest.mark.parametrize("status", ["204", "304", "103"])
def test_bodiless_statuses(echo: Shim, status: str) -> None:
    result = echo.request(route(f"status?{status}"))
    assert result.done == f"D {echo.seq} k"
    assert result.raw.endswith(b"\r\n\r\n")
    assert result.response.status == int(status)
    assert result.response.header("X-Status") == "set"
    assert result.response.header("Transfer-Encoding") is None
    assert result.response.header("Content-Length") is None


def test_unknown_status_has_an_empty_reason(echo: Shim) -> None:
    result = echo.request(route("status?599"))
    assert (result.response.status, result.response.reason) == (599, "")
    assert result.response.body == b"ignored body"


def test_string_status(echo: Shim) -> None:
    result = echo.request(route("string-status"))
    assert (result.response.status, result.response.reason) == (201, "Created")


def test_multiline_header_values_are_separate_headers(echo: Shim) -> None:
    assert echo.request(route("cookies")).response.headers_named("Set-Cookie") == ["a=1", "b=2"]
    assert echo.request(route("array-header")).response.headers_named("x-multi") == ["one", "two"]


def test_body_parts_in_different_encodings(echo: Shim) -> None:
    assert echo.request(route("many-parts")).response.body == "abc\u00e9".encode()
    result = echo.request(route("utf8-header"))
    assert result.response.header("X-Name") == "caf\u00e9".encode().decode("latin-1")
    assert result.response.body == "caf\u00e9".encode() + b"\xff"


def test_keep_alive_connection_serves_two_requests(echo: Shim) -> None:
    connection = echo.connect()
    assert echo.send(connection, route("stream")) == f"D {echo.seq} k"
    # The shim closed its copy; the connection lives on in the core's.
    assert echo.send(connection, http_head()) == f"D {echo.seq} k"
    first, rest = parse_response(connection.finish())
    second, rest = parse_response(rest)
    assert first.body == b"line 0\nline 1\nline 2\n"
    assert second.json()["PATH_INFO"] == "/"
    assert rest == b""


def test_to_path_sends_the_file(echo: Shim, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "download.bin"
    path.write_bytes(data)
    result = echo.request(route("download", ("X-File", str(path))))
    assert result.done == f"D {echo.seq} k"
    assert result.response.header("Content-Length") == str(len(data))
    assert result.response.body == data
    head = echo.request(route("download", ("X-File", str(path)), method="HEAD"))
    assert head.response.header("Content-Length") == str(len(data))
    assert head.raw.endswith(b"\r\n\r\n")


def test_to_path_of_the_echo_app(echo: Shim) -> None:
    result = echo.request(route("file"))
    assert result.response.body == (APPS / "echo_rack" / "config.ru").read_bytes()


def test_to_path_that_is_not_a_regular_file_falls_back_to_each(echo: Shim) -> None:
    result = echo.request(route("download", ("X-File", "/dev/null")))
    assert result.done == f"D {echo.seq} k"
    assert result.response.status == 200
    assert result.response.body == b""


def test_big_array_body(echo: Shim) -> None:
    result = echo.request(route("big-array"))
    assert result.response.header("Content-Length") == "3000000"
    assert result.response.body == b"y" * 3_000_000


def test_close_is_called(echo: Shim, close_marker: Path) -> None:
    close_marker.unlink(missing_ok=True)
    result = echo.request(route("close"))
    assert result.response.body == b"ab"
    assert close_marker.read_text() == "closed\n"


def test_close_is_called_when_iteration_raises(echo: Shim, close_marker: Path) -> None:
    close_marker.unlink(missing_ok=True)
    result = echo.request(route("close-raise"))
    assert result.response.status == 500
    assert close_marker.read_text() == "closed\n"


def test_client_gone_reports_c(echo: Shim) -> None:
    logged_before = len(echo.log())
    connection = echo.connect()
    connection.reset_by_client()
    assert echo.send(connection, route("big")) == f"D {echo.seq} c"
    # A client going away is routine, not an error worth a backtrace.
    assert echo.log()[logged_before:] == ""


def test_the_client_descriptor_stays_non_blocking(echo: Shim) -> None:
    connection = echo.connect()
    echo.send(connection, route("big"))
    flags = fcntl.fcntl(connection.server.fileno(), fcntl.F_GETFL)
    assert flags & os.O_NONBLOCK
    response, _ = parse_response(connection.finish())
    assert len(response.body) == 160 * 65536


# Errors


def test_app_exception_is_a_500_without_backtrace_in_production(echo: Shim) -> None:
    result = echo.request(route("raise"))
    assert result.done == f"D {echo.seq} k"
    assert result.response.status == 500
    assert result.response.header("Content-Type") == "text/html; charset=utf-8"
    assert b"Internal Server Error" in result.response.body
    assert b"raised on purpose" not in result.response.body
    assert "echo app raised on purpose (RuntimeError)" in echo.log()
    assert "error in request" in echo.log()


def test_app_exception_shows_the_backtrace_in_development(tmp_path: Path) -> None:
    shim = start_app(APPS / "echo_rack", tmp_path, environment="development")
    try:
        result = shim.request(route("raise"))
        assert result.response.status == 500
        assert b"echo app raised on purpose (RuntimeError)" in result.response.body
        assert b"config.ru:" in result.response.body
    finally:
        shim.stop()


def test_500_on_a_connection_that_may_not_stay_open(echo: Shim) -> None:
    result = echo.request(route("raise"), flags="-")
    assert result.done == f"D {echo.seq} c"
    assert result.response.status == 500


@pytest.mark.parametrize("name", ["bad-header", "bad-name", "bad-status", "bad-chunk"])
def test_invalid_responses_are_500(echo: Shim, name: str) -> None:
    result = echo.request(route(name))
    assert result.response.status == 500
    assert b"should not be sent" not in result.raw
    assert b"Injected" not in result.raw


def test_exception_after_the_response_began_closes(echo: Shim) -> None:
    connection = echo.connect()
    assert echo.send(connection, route("raise-after")) == f"D {echo.seq} c"
    raw = connection.finish()
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert raw.endswith(b"7\r\npartial\r\n")  # no last chunk: the client sees a cut response
    assert "raised after the response began" in echo.log()


# The access log's fields in D


def test_d_reports_status_and_body_bytes_of_a_whole_response(echo: Shim) -> None:
    result = echo.request(route("hello"))
    assert echo.replies[-1] == f"D {echo.seq} k 200 11"
    assert (result.status, result.size) == (200, len(b"hello world"))
    big = echo.request(route("big-array"))  # head and body in separate writes
    assert (big.status, big.size) == (200, 3_000_000)
    created = echo.request(route("string-status"))
    assert (created.status, created.size) == (201, len(b"created"))


def test_d_reports_body_bytes_of_a_chunked_response_without_the_framing(echo: Shim) -> None:
    result = echo.request(route("stream"))
    assert result.response.chunked
    assert echo.replies[-1] == f"D {echo.seq} k 200 {len(b'line 0 line 1 line 2 ')}"
    called = echo.request(route("call"))
    assert (called.status, called.size) == (200, len(b"streamed by call"))
    length = echo.request(route("stream-length"))
    assert (length.status, length.size) == (200, 10)


def test_d_reports_no_body_bytes_for_head(echo: Shim) -> None:
    echo.request(route("hello", method="HEAD"))
    assert echo.replies[-1] == f"D {echo.seq} k 200 0"
    echo.request(route("stream", method="HEAD"))
    assert echo.replies[-1] == f"D {echo.seq} k 200 0"


def test_d_reports_the_500_page_the_shim_sent(echo: Shim) -> None:
    result = echo.request(route("raise"))
    assert echo.replies[-1] == f"D {echo.seq} k 500 {len(result.response.body)}"
    assert result.size and result.size > 0


def test_d_reports_a_file_body(echo: Shim) -> None:
    result = echo.request(route("file"))
    size = (APPS / "echo_rack" / "config.ru").stat().st_size
    assert (result.status, result.size) == (200, size)


def test_d_reports_what_was_sent_before_an_error_after_the_response_began(echo: Shim) -> None:
    connection = echo.connect()
    echo.send(connection, route("raise-after"))
    assert echo.replies[-1] == f"D {echo.seq} c 200 {len(b'partial')}"
    connection.finish()


def test_d_has_no_access_log_fields_when_the_response_never_began(echo: Shim) -> None:
    connection = echo.connect()
    connection.reset_by_client()
    echo.send(connection, route("big"))
    assert echo.replies[-1] == f"D {echo.seq} c"


def test_the_process_keeps_serving_after_errors(echo: Shim) -> None:
    echo.request(route("raise"))
    assert echo.request(http_head()).response.status == 200


# Frameworks through their config.ru


@pytest.fixture(scope="module")
def sinatra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shim]:
    need("sinatra/base")
    shim = start_app(APPS / "sinatra_app", tmp_path_factory.mktemp("sinatra"))
    try:
        yield shim
    finally:
        shim.stop()


@pytest.fixture(scope="module")
def rails(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shim]:
    need("action_controller/railtie")
    shim = start_app(APPS / "rails_app", tmp_path_factory.mktemp("rails"))
    try:
        yield shim
    finally:
        shim.stop()


def test_sinatra_routes_and_params(sinatra: Shim) -> None:
    result = sinatra.request(http_head())
    assert result.done == f"D {sinatra.seq} k"
    assert result.response.body == b"Hello from Sinatra"
    assert sinatra.request(http_head("/hello/world")).response.body == b"Hello, world!"
    found = sinatra.request(http_head("/search?q=caf%C3%A9&page=2")).response.json()
    assert found == {"q": "caf\u00e9", "page": 2, "script_name": ""}


def test_sinatra_json_and_form_posts(sinatra: Shim) -> None:
    payload = json.dumps({"name": "widget", "sizes": [1, 2]}).encode()
    head = http_head("/json", ("Content-Type", "application/json"), method="POST")
    assert sinatra.request(head, payload).response.json() == {
        "received": {"name": "widget", "sizes": [1, 2]},
        "content_length": str(len(payload)),
    }
    form = b"name=caf%C3%A9&tags[]=a&tags[]=b"
    head = http_head("/form", ("Content-Type", "application/x-www-form-urlencoded"), method="POST")
    assert sinatra.request(head, form).response.json() == {"name": "caf\u00e9", "tags": ["a", "b"]}


def test_sinatra_multipart_upload_from_a_body_file(sinatra: Shim, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    content_type, body = multipart({"note": "big one"}, {"file": ("photo.bin", data)})
    path = tmp_path / "upload"
    path.write_bytes(body)
    head = http_head("/upload", ("Content-Type", content_type), method="POST")
    result = sinatra.request(head, body, body_file=path)
    assert result.response.json() == {
        "filename": "photo.bin",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "note": "big one",
    }


def test_sinatra_stream_halt_not_found_and_error(sinatra: Shim) -> None:
    streamed = sinatra.request(http_head("/stream"))
    assert streamed.response.chunked
    assert streamed.response.body == b"first;second;third"
    halted = sinatra.request(http_head("/halt"))
    assert (halted.response.status, halted.response.body) == (403, b"forbidden here")
    missing = sinatra.request(http_head("/no/such/page"))
    assert (missing.response.status, missing.response.body) == (404, b"custom not found")
    failed = sinatra.request(http_head("/error"))
    assert failed.response.status == 500
    assert failed.response.body == b"custom error page: sinatra route failed"
    assert failed.done == f"D {sinatra.seq} k"


def test_rails_routes_params_and_log(rails: Shim) -> None:
    result = rails.request(http_head())
    assert result.done == f"D {rails.seq} k"
    assert result.response.body == b"Hello from Rails"
    shown = rails.request(http_head("/items/42?q=caf%C3%A9")).response.json()
    assert shown == {"id": "42", "q": "caf\u00e9", "path": "/items/42", "script_name": ""}
    assert 'Started GET "/items/42?q=caf%C3%A9"' in rails.log()


def test_rails_json_and_form_creates(rails: Shim) -> None:
    payload = json.dumps({"item": {"name": "widget", "count": 3}}).encode()
    head = http_head("/items", ("Content-Type", "application/json"), method="POST")
    created = rails.request(head, payload).response
    assert created.status == 201
    assert created.json() == {
        "item": {"name": "widget", "count": 3},
        "format": "application/json",
    }
    form = b"item[name]=gadget&item[count]=4&item[ignored]=x"
    head = http_head("/items", ("Content-Type", "application/x-www-form-urlencoded"), method="POST")
    created = rails.request(head, form).response
    assert created.json() == {
        "item": {"name": "gadget", "count": "4"},
        "format": "application/x-www-form-urlencoded",
    }


def test_rails_error_is_its_own_500_page(rails: Shim) -> None:
    result = rails.request(http_head("/fail"))
    assert result.response.status == 500
    assert result.done == f"D {rails.seq} k"
    assert "ArgumentError (rails action failed)" in rails.log()
