"""The Node shim driven over its real protocol (docs/protocol/spawn.md, handoff.md "Node").

The test plays the core: it starts `node appmanager_node.js` with Node's IPC channel on fd 3
(NODE_CHANNEL_FD, JSON lines over a SOCK_STREAM socketpair) and a progress file on fd 4, does the
handshake, reads the first request off real loopback TCP connections and hands each connection
over by SCM_RIGHTS in a NODE_HANDLE message. The client's end reads what the app writes to it.
"""

from __future__ import annotations

import base64
import fcntl
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / "spawners" / "node" / "appmanager_node.js"
APPS = ROOT / "tests" / "apps"
ECHO_APP = APPS / "echo_node" / "app.js"
EXPRESS_APP = APPS / "express_app" / "app.js"
NODE = shutil.which("node")
TIMEOUT = 10.0
SLOTS = 65536

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")
needs_express = pytest.mark.skipif(
    not (APPS / "express_app" / "node_modules" / "express").is_dir(),
    reason="Express is not installed: run `npm ci` in tests/apps/express_app",
)


@dataclass
class Response:
    """A response as the client read it, the body de-chunked."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """A loopback connection: the client's end, and the core's end, whose copy goes to the shim."""

    def __init__(self, family: int = socket.AF_INET) -> None:
        if family == socket.AF_INET:
            self.client, self.server = _tcp_pair()
        else:
            self.client, self.server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.client.settimeout(TIMEOUT)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.client.sendall(data)

    def _fill(self) -> bool:
        data = self.client.recv(1 << 16)
        self.buffer += data
        return bool(data)

    def _take_line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"connection closed mid-line: {self.buffer[:200]!r}")
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise ConnectionError(f"connection closed {len(self.buffer)} of {size} bytes in")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read(self, *, head_request: bool = False) -> Response:
        """Reads one response (keep-alive and pipelining leave the rest in the buffer)."""
        version, status, *_ = self._take_line().decode("latin-1").split(" ", 2)
        assert version == "HTTP/1.1", version
        headers: dict[str, str] = {}
        while line := self._take_line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        response = Response(int(status), headers, b"")
        if head_request or response.status in (204, 304):
            return response
        if headers.get("transfer-encoding") == "chunked":
            while size := int(self._take_line().split(b";")[0], 16):
                response.body += self._take(size)
                assert self._take(2) == b"\r\n"
            assert self._take_line() == b""
        elif "content-length" in headers:
            response.body = self._take(int(headers["content-length"]))
        else:
            while self._fill():
                pass
            response.body, self.buffer = self.buffer, b""
        return response

    def wait_for(self, data: bytes) -> None:
        """Reads until ``data`` has arrived, leaving it in the buffer for read()."""
        while data not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"connection closed before {data!r}: {self.buffer!r}")

    def read_until_closed(self) -> bytes:
        """What the client reads until the connection closes."""
        while self._fill():
            pass
        data, self.buffer = self.buffer, b""
        return data

    def closed_by_peer(self, timeout: float = TIMEOUT) -> bool:
        """Whether the other side closes the connection (EOF) within ``timeout``."""
        self.client.settimeout(timeout)
        try:
            return self.read_until_closed() == b""
        except TimeoutError:
            return False
        finally:
            self.client.settimeout(TIMEOUT)

    def close(self) -> None:
        self.client.close()
        self.server.close()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        server, _ = listener.accept()
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # As the core's copy: non-blocking.
    server.setblocking(False)
    return client, server


def http_request(
    target: str = "/",
    *headers: tuple[str, str],
    method: str = "GET",
    body: bytes = b"",
    version: str = "HTTP/1.1",
) -> bytes:
    """A request as a client would send it."""
    lines = [f"{method} {target} {version}", "Host: example.test:8080"]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Shim:
    """A running Node shim and the core's ends of its channels."""

    process: subprocess.Popen[bytes]
    control: socket.socket
    progress_fd: int
    log_path: Path
    inbox: list[dict[str, Any]] = field(default_factory=list)
    pending: bytes = b""
    seq: int = 0
    slots: dict[int, int] = field(default_factory=dict)
    clients: dict[int, Client] = field(default_factory=dict)

    def send(self, message: dict[str, Any], fd: int | None = None) -> None:
        line = json.dumps(message).encode() + b"\n"
        if fd is None:
            self.control.sendall(line)
            return
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
        assert self.control.sendmsg([line], rights) == len(line)

    def _read_messages(self, timeout: float) -> bool:
        """Adds what the shim sent within ``timeout`` to the inbox; False at EOF."""
        ready, _, _ = select.select([self.control], [], [], timeout)
        if not ready:
            return True
        data = self.control.recv(1 << 16)
        if not data:
            return False
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            message = json.loads(line)
            # Node's own acknowledgement of each descriptor; the core ignores it.
            if message == {"cmd": "NODE_HANDLE_ACK"}:
                continue
            if message.get("cmd") == "APPMANAGER_CLOSED" and message["seq"] in self.clients:
                # As the core does: its copy of the connection goes too.
                self.clients[message["seq"]].server.close()
            self.inbox.append(message)
        return True

    def expect(self, cmd: str, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        """The next message ``cmd`` with ``fields``, taken from the inbox."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.inbox:
                if message.get("cmd") == cmd and all(
                    message.get(k) == v for k, v in fields.items()
                ):
                    self.inbox.remove(message)
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {cmd} {fields} in {self.inbox}; log:\n{self.log()}")
            if not self._read_messages(min(left, 0.2)):
                raise AssertionError(f"channel closed before {cmd} {fields}; log:\n{self.log()}")

    def closed_messages(self, timeout: float = 0.2) -> list[int]:
        """The seqs of the APPMANAGER_CLOSED messages that came within ``timeout``."""
        self._read_messages(timeout)
        seqs = [m["seq"] for m in self.inbox if m.get("cmd") == "APPMANAGER_CLOSED"]
        self.inbox = [m for m in self.inbox if m.get("cmd") != "APPMANAGER_CLOSED"]
        return seqs

    def handshake(
        self, app_root: Path, startup: str = "app.js", **overrides: Any
    ) -> dict[str, Any]:
        """Sends APPMANAGER_SPAWN; returns the READY or ERROR answer."""
        message = {
            "cmd": "APPMANAGER_SPAWN",
            "protocol": 1,
            "app_root": str(app_root),
            "app_type": "node",
            "startup_file": str(app_root / startup),
            "callables": [],
            "environment": "production",
            "base_uri": "",
            "app_name": app_root.name,
            **overrides,
        }
        self.send(message)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            for answer in self.inbox:
                if answer.get("cmd") in ("APPMANAGER_READY", "APPMANAGER_ERROR"):
                    self.inbox.remove(answer)
                    return answer
            if not self._read_messages(0.2):
                raise AssertionError(f"channel closed before the answer; log:\n{self.log()}")
        raise AssertionError(f"no answer to APPMANAGER_SPAWN; log:\n{self.log()}")

    def hand(
        self, first: bytes = b"", *, family: int = socket.AF_INET, scheme: str = "http"
    ) -> tuple[Client, int]:
        """Opens a connection whose client sends ``first``; reads those bytes as the core would
        and hands the connection to the shim. Returns the client and the connection's seq."""
        client = Client(family)
        data = b""
        if first:
            client.send(first)
            while len(data) < len(first):
                select.select([client.server], [], [], TIMEOUT)
                data += client.server.recv(len(first) - len(data))
        self.seq += 1
        self.clients[self.seq] = client
        slot = self.seq % SLOTS
        self.slots[self.seq] = slot
        peer = client.client.getsockname() if family == socket.AF_INET else ("127.0.0.1", 0)
        conn = {
            "cmd": "APPMANAGER_CONN",
            "seq": self.seq,
            "slot": slot,
            "data": base64.b64encode(data).decode(),
            "remote_addr": peer[0],
            "remote_port": peer[1],
            "server_addr": "127.0.0.1",
            "server_port": 8000,
            "scheme": scheme,
        }
        self.send(
            {"cmd": "NODE_HANDLE", "type": "net.Socket", "msg": conn, "key": None},
            fd=client.server.fileno(),
        )
        return client, self.seq

    def request(self, first: bytes, **kwargs: Any) -> Response:
        """One request on a fresh connection."""
        client, _ = self.hand(first, **kwargs)
        return client.read(head_request=first.startswith(b"HEAD "))

    def progress(self, seq: int) -> int:
        return os.pread(self.progress_fd, 1, self.slots[seq])[0]

    def wait_progress(self, seq: int, value: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.progress(seq) != value:
            assert time.monotonic() < deadline, f"progress of {seq} stays {self.progress(seq)}"
            time.sleep(0.005)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        for client in self.clients.values():
            client.close()
        self.control.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(TIMEOUT)
        os.close(self.progress_fd)


def start_shim(log_dir: Path) -> Shim:
    """Starts the shim as the core does: the channel on fd 3, the progress file on fd 4, its own
    session, and a working directory that is not the app root."""
    core_end, shim_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    progress_fd = os.memfd_create("appmanager-progress", os.MFD_CLOEXEC)
    os.ftruncate(progress_fd, SLOTS)
    log_path = log_dir / f"shim-{time.monotonic_ns()}.log"
    control_fd = shim_end.fileno()

    def channels_on_3_and_4() -> None:
        # Copies above 4 first, so that neither dup2 overwrites the other's source.
        control_copy = fcntl.fcntl(control_fd, fcntl.F_DUPFD_CLOEXEC, 10)
        progress_copy = fcntl.fcntl(progress_fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.dup2(control_copy, 3)
        os.dup2(progress_copy, 4)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPMANAGER_", "NODE_"))}
    env.update(
        NODE_CHANNEL_FD="3",
        NODE_CHANNEL_SERIALIZATION_MODE="json",
        APPMANAGER_PROGRESS_FD="4",
        APPMANAGER_ENV="production",
        NODE_ENV="production",
    )
    assert NODE is not None
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [NODE, str(SHIM)],
            cwd=log_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Every descriptor of ours is close-on-exec; close_fds would close 3 and 4 as well.
            close_fds=False,
            preexec_fn=channels_on_3_and_4,
            start_new_session=True,
        )
    shim_end.close()
    return Shim(process, core_end, progress_fd, log_path)


Spawn = Callable[..., tuple[Shim, dict[str, Any]]]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Starts shims on an app directory, or on app files written under tmp_path; stops every one
    of them afterwards."""
    shims: list[Shim] = []

    def spawn(
        app: Path | dict[str, str], startup: str = "app.js", **config: Any
    ) -> tuple[Shim, dict[str, Any]]:
        if isinstance(app, dict):
            root = tmp_path / f"app{len(shims)}"
            for name, text in app.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_text(textwrap.dedent(text))
        else:
            root = app
        shim = start_shim(tmp_path)
        shims.append(shim)
        return shim, shim.handshake(root, startup, **config)

    try:
        yield spawn
    finally:
        for shim in shims:
            shim.stop()


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shim]:
    """One shim on the echo app, shared by the tests that only send requests."""
    shim = start_shim(tmp_path_factory.mktemp("echo"))
    try:
        answer = shim.handshake(ECHO_APP.parent)
        assert answer["cmd"] == "APPMANAGER_READY", answer
        yield shim
    finally:
        shim.stop()


@pytest.fixture(scope="module")
def express(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shim]:
    """One shim on the Express app, mounted under /shop."""
    shim = start_shim(tmp_path_factory.mktemp("express"))
    try:
        answer = shim.handshake(EXPRESS_APP.parent, base_uri="/shop")
        assert answer["cmd"] == "APPMANAGER_READY", answer
        yield shim
    finally:
        shim.stop()


# The handshake


def test_ready_names_the_pid_and_concurrency(spawn: Spawn) -> None:
    shim, answer = spawn(ECHO_APP.parent)
    assert answer == {
        "cmd": "APPMANAGER_READY",
        "pid": shim.process.pid,
        "concurrency": 0,
        "protocol": 1,
    }


def test_load_error_fails_load_app_with_the_stack(spawn: Spawn) -> None:
    app = {"app.js": "require('no_such_module_for_appmanager_tests');\n"}
    shim, answer = spawn(app)
    assert answer["cmd"] == "APPMANAGER_ERROR"
    assert answer["step"] == "LOAD_APP"
    assert answer["message"].startswith(
        "Error: Cannot find module 'no_such_module_for_appmanager_tests'"
    )
    assert "app.js" in answer["traceback"]
    assert shim.wait_exit() == 1


def test_syntax_error_fails_load_app(spawn: Spawn) -> None:
    shim, answer = spawn({"app.js": "const = ;\n"})
    assert (answer["cmd"], answer["step"]) == ("APPMANAGER_ERROR", "LOAD_APP")
    assert answer["message"].startswith("SyntaxError:")
    assert shim.wait_exit() == 1


def test_process_exit_while_loading_fails_load_app(spawn: Spawn) -> None:
    shim, answer = spawn({"app.js": "process.exit(3);\n"})
    assert (answer["cmd"], answer["step"]) == ("APPMANAGER_ERROR", "LOAD_APP")
    assert "process.exit(3)" in answer["message"]
    assert shim.wait_exit() == 3


def test_unknown_protocol_version_fails_prepare(spawn: Spawn) -> None:
    shim, answer = spawn(ECHO_APP.parent, protocol=2)
    assert (answer["cmd"], answer["step"]) == ("APPMANAGER_ERROR", "PREPARE")
    assert "protocol 2" in answer["message"]
    assert shim.wait_exit() == 1


def test_async_error_before_listen_fails_listen(spawn: Spawn) -> None:
    app = {"app.js": "setTimeout(() => { throw new Error('no database'); }, 50);\n"}
    shim, answer = spawn(app)
    assert (answer["cmd"], answer["step"]) == ("APPMANAGER_ERROR", "LISTEN")
    assert answer["message"] == "Error: no database"
    assert shim.wait_exit() == 1


def test_late_listen_answers_ready_then(spawn: Spawn) -> None:
    app = {
        "app.js": """
            const http = require('http');
            setTimeout(() => {
              http.createServer((req, res) => res.end('late')).listen(8080);
            }, 200);
        """
    }
    shim, answer = spawn(app)
    assert answer["cmd"] == "APPMANAGER_READY", answer
    assert shim.request(http_request()).body == b"late"


@pytest.mark.parametrize(
    "source",
    [
        "module.exports = (req, res) => res.end('exported listener');",
        "module.exports = require('http').createServer((req, res) => res.end('exported server'));",
    ],
    ids=["listener", "server"],
)
def test_an_app_that_exports_instead_of_listening_is_served(spawn: Spawn, source: str) -> None:
    shim, answer = spawn({"app.js": source})
    assert answer["cmd"] == "APPMANAGER_READY", answer
    assert shim.request(http_request()).body.startswith(b"exported ")


def test_an_exported_server_may_still_listen_later(spawn: Spawn) -> None:
    app = {
        "app.js": """
            const http = require('http');
            const server = http.createServer((req, res) => res.end(String(server.address().port)));
            module.exports = server;
            setTimeout(() => server.listen(5000, () => console.log('listening late')), 100);
        """
    }
    shim, answer = spawn(app)
    assert answer["cmd"] == "APPMANAGER_READY", answer
    deadline = time.monotonic() + TIMEOUT
    while "listening late" not in shim.log():
        assert time.monotonic() < deadline, shim.log()
        time.sleep(0.01)
    assert shim.request(http_request()).body == b"5000"


def test_the_startup_file_is_the_main_module(spawn: Spawn) -> None:
    app = {
        "server.js": """
            const http = require('http');
            const server = http.createServer((req, res) => {
              res.end(JSON.stringify({ argv1: process.argv[1], address: server.address() }));
            });
            if (require.main === module) server.listen(4000);
        """
    }
    shim, answer = spawn(app, "server.js")
    assert answer["cmd"] == "APPMANAGER_READY", answer
    data = shim.request(http_request()).json()
    assert data["argv1"].endswith("server.js")
    # The app looks to be listening where it asked, though no port was bound.
    assert data["address"] == {"address": "127.0.0.1", "family": "IPv4", "port": 4000}


def test_an_es_module_app_is_loaded(spawn: Spawn) -> None:
    app = {
        "app.mjs": """
            import http from 'node:http';
            await Promise.resolve();
            http.createServer((req, res) => res.end('from esm')).listen(3000);
        """
    }
    shim, answer = spawn(app, "app.mjs")
    assert answer["cmd"] == "APPMANAGER_READY", answer
    assert shim.request(http_request()).body == b"from esm"


def test_a_second_server_listens_for_real(spawn: Spawn) -> None:
    app = {
        "app.js": """
            const http = require('http');
            http.createServer((req, res) => res.end('main')).listen(3000);
            const admin = http.createServer((req, res) => res.end('admin'));
            admin.listen(0, '127.0.0.1', () => console.log('admin port', admin.address().port));
        """
    }
    shim, answer = spawn(app)
    assert answer["cmd"] == "APPMANAGER_READY", answer
    assert shim.request(http_request()).body == b"main"
    deadline = time.monotonic() + TIMEOUT
    while "admin port" not in shim.log():
        assert time.monotonic() < deadline, shim.log()
        time.sleep(0.01)
    port = int(shim.log().split("admin port")[1].split()[0])
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(http_request("/", ("Connection", "close")))
        assert sock.makefile("rb").read().endswith(b"admin")


# Requests and connections


def test_a_request_is_answered_on_the_handed_connection(echo: Shim) -> None:
    body = os.urandom(5000)
    client, seq = echo.hand(http_request("/some/path?a=1", method="POST", body=body))
    response = client.read()
    assert response.status == 200
    data = response.json()
    assert data["method"] == "POST"
    assert data["url"] == "/some/path?a=1"
    assert data["headers"]["host"] == "example.test:8080"
    assert data["body"] == {"length": 5000, "sha256": hashlib.sha256(body).hexdigest()}
    assert data["remoteAddress"] == "127.0.0.1"
    assert data["env"] == "production"
    assert data["cwd"] == str(ECHO_APP.parent)
    assert data["encrypted"] is False


def test_a_body_larger_than_what_the_core_read_is_read_from_the_socket(echo: Shim) -> None:
    body = os.urandom(300_000)
    request = http_request("/", method="PUT", body=body)
    head_len = request.index(b"\r\n\r\n") + 4
    # The core read the head and a little of the body; the rest comes from the socket.
    client, _ = echo.hand(request[: head_len + 10])
    client.send(request[head_len + 10 :])
    data = client.read().json()
    assert data["body"] == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def test_keep_alive_requests_go_straight_to_node(echo: Shim) -> None:
    client, seq = echo.hand(http_request("/first"))
    assert client.read().json()["url"] == "/first"
    client.send(http_request("/second"))
    assert client.read().json()["url"] == "/second"
    # Nothing went through the core for the second request: no message about this connection.
    assert seq not in echo.closed_messages()


def test_pipelined_requests_are_answered_in_order(echo: Shim) -> None:
    # Two requests in the bytes the core read, a third straight behind them.
    client, _ = echo.hand(http_request("/one") + http_request("/app/stream"))
    client.send(http_request("/three"))
    assert client.read().json()["url"] == "/one"
    assert client.read().body == b"line 0\nline 1\nline 2\n"
    assert client.read().json()["url"] == "/three"


def test_a_connection_handed_before_any_request(echo: Shim) -> None:
    client, seq = echo.hand(b"")
    assert echo.progress(seq) == 0
    client.send(http_request("/late"))
    assert client.read().json()["url"] == "/late"


def test_closed_is_reported_when_the_client_closes(echo: Shim) -> None:
    client, seq = echo.hand(http_request())
    client.read()
    client.client.close()
    echo.expect("APPMANAGER_CLOSED", seq=seq)
    assert echo.progress(seq) == 0


def test_connection_close_closes_it_for_the_client_too(echo: Shim) -> None:
    client, seq = echo.hand(http_request("/", ("Connection", "close")))
    assert client.read().status == 200
    # The core still holds its copy; the client sees EOF all the same.
    assert client.closed_by_peer()
    echo.expect("APPMANAGER_CLOSED", seq=seq)


def test_a_unix_socket_connection_gets_the_core_s_address(echo: Shim) -> None:
    response = echo.request(http_request(), family=socket.AF_UNIX)
    assert response.json()["remoteAddress"] == "127.0.0.1"


def test_https_scheme_marks_the_socket_encrypted(echo: Shim) -> None:
    assert echo.request(http_request(), scheme="https").json()["encrypted"] is True


def test_streamed_response_is_chunked(echo: Shim) -> None:
    response = echo.request(http_request("/app/stream"))
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.body == b"line 0\nline 1\nline 2\n"


def test_bodiless_status(echo: Shim) -> None:
    client, _ = echo.hand(http_request("/app/status?204"))
    assert client.read().status == 204
    client.send(http_request("/after"))
    assert client.read().json()["url"] == "/after"


def test_app_output_reaches_the_log(echo: Shim) -> None:
    assert echo.request(http_request("/app/print")).body == b"printed"
    assert "hello from the app's stdout" in echo.log()
    assert "and its stderr" in echo.log()
    assert "echo app listening on" in echo.log()


def test_no_descriptor_leaks_into_subprocesses_of_the_app(echo: Shim) -> None:
    # The channel, the progress file and the client connections are all close-on-exec. (Node
    # marks what it inherits from fd 3 on; descriptors this test runner inherited past a gap
    # may show up, and are not the shim's.)
    client, _ = echo.hand(http_request("/app/fds"))
    leaked = client.read().json()
    assert [fd for fd in leaked if fd["fd"] in (3, 4)] == []
    assert [fd for fd in leaked if fd["target"].startswith(("socket:", "/memfd:"))] == []


# Progress


def test_progress_follows_each_request(echo: Shim) -> None:
    # Received, no response yet: the app sleeps before it writes anything.
    client, seq = echo.hand(http_request("/app/sleep?0.3"))
    echo.wait_progress(seq, 1)
    client.read()
    echo.wait_progress(seq, 0)
    # The head and part of the body are out: a crash now must not get a 502 appended.
    client.send(http_request("/app/hold"))
    client.wait_for(b"held;")
    echo.wait_progress(seq, 2)
    assert echo.request(http_request("/app/release")).body == b"ok"
    assert client.read().body == b"held;released"
    echo.wait_progress(seq, 0)


def test_a_pipelined_request_behind_a_finished_one_is_received(echo: Shim) -> None:
    client, seq = echo.hand(http_request("/") + http_request("/app/sleep?0.3"))
    client.read()
    # The first response is done, the second request is waiting for its answer.
    echo.wait_progress(seq, 1)
    client.read()
    echo.wait_progress(seq, 0)


# Errors


def test_a_synchronous_throw_is_a_500_and_the_process_lives_on(echo: Shim) -> None:
    client, _ = echo.hand(http_request("/app/raise"))
    response = client.read()
    assert response.status == 500
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert b"Internal Server Error" in response.body
    assert b"echo app raised on purpose" not in response.body
    assert "Error: echo app raised on purpose" in echo.log()
    # The same connection serves on.
    client.send(http_request("/after-the-error"))
    assert client.read().json()["url"] == "/after-the-error"


def test_a_throw_after_the_head_closes_the_connection(echo: Shim) -> None:
    client, seq = echo.hand(http_request("/app/raise-after-head"))
    # What was written reaches the client, then the end of the connection, though the core
    # still holds its copy.
    raw = client.read_until_closed()
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert raw.endswith(b"7\r\npartial\r\n")  # no last chunk: the client sees a cut response
    echo.expect("APPMANAGER_CLOSED", seq=seq)
    assert echo.request(http_request()).status == 200


def test_the_500_shows_the_stack_in_development(spawn: Spawn) -> None:
    shim, answer = spawn(ECHO_APP.parent, environment="development")
    assert answer["cmd"] == "APPMANAGER_READY"
    response = shim.request(http_request("/app/raise"))
    assert response.status == 500
    assert b"Error: echo app raised on purpose" in response.body


def test_an_uncaught_exception_answers_500_and_exits_1(spawn: Spawn) -> None:
    shim, answer = spawn(ECHO_APP.parent)
    assert answer["cmd"] == "APPMANAGER_READY"
    idle, idle_seq = shim.hand(http_request())
    idle.read()
    client, seq = shim.hand(http_request("/app/async-raise"))
    response = client.read()
    assert response.status == 500
    assert response.headers["connection"] == "close"
    assert shim.wait_exit() == 1
    assert "Error: echo app raised asynchronously" in shim.log()
    # What the core reads once the process is gone: nothing for it to answer 502 on.
    assert shim.progress(seq) == 0
    assert shim.progress(idle_seq) == 0


def test_exit_in_a_keep_alive_request_leaves_it_for_the_core_to_answer(spawn: Spawn) -> None:
    shim, answer = spawn(ECHO_APP.parent)
    assert answer["cmd"] == "APPMANAGER_READY"
    client, seq = shim.hand(http_request())
    client.read()
    shim.wait_progress(seq, 0)
    # Not the request the core read: the shim's own bookkeeping must mark it.
    client.send(http_request("/app/crash"))
    assert shim.wait_exit() == 7
    assert shim.progress(seq) == 1


def test_a_crash_leaves_a_received_request_for_the_core_to_answer(spawn: Spawn) -> None:
    shim, answer = spawn(ECHO_APP.parent)
    assert answer["cmd"] == "APPMANAGER_READY"
    begun, begun_seq = shim.hand(http_request("/app/hold"))
    begun.wait_for(b"held;")
    shim.wait_progress(begun_seq, 2)
    _, seq = shim.hand(http_request("/app/crash"))
    assert shim.wait_exit() == 7
    # The core answers 502 on a connection whose byte is 1, and closes those at 2 or 0.
    assert shim.progress(seq) == 1
    assert shim.progress(begun_seq) == 2


# Base URI


@pytest.mark.parametrize(
    ("target", "url"),
    [
        ("/sub", "/"),
        ("/sub/", "/"),
        ("/sub/x/y?z=1", "/x/y?z=1"),
        ("/sub?q=1", "/?q=1"),
        ("/subway", "/subway"),
        ("/other", "/other"),
    ],
)
def test_the_base_uri_is_stripped_at_a_segment_boundary(
    spawn: Spawn, target: str, url: str
) -> None:
    shim, answer = spawn(ECHO_APP.parent, base_uri="/sub/")
    assert answer["cmd"] == "APPMANAGER_READY"
    data = shim.request(http_request(target)).json()
    assert data["url"] == url
    assert data["originalUrl"] == (target if url != target else None)


# The access log (APPMANAGER_LOG)


@pytest.fixture(scope="module")
def logging_echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shim]:
    """A shim on the echo app whose SPAWN turned the access log on."""
    shim = start_shim(tmp_path_factory.mktemp("logging_echo"))
    try:
        answer = shim.handshake(ECHO_APP.parent, access_log=True)
        assert answer["cmd"] == "APPMANAGER_READY", answer
        yield shim
    finally:
        shim.stop()


def test_each_response_is_reported_for_the_access_log(logging_echo: Shim) -> None:
    shim = logging_echo
    headers = (("Referer", "http://ref.test/page"), ("User-Agent", "tester/1.0"))
    client, seq = shim.hand(http_request("/some/path?a=1", *headers))
    body = client.read().body
    assert shim.expect("APPMANAGER_LOG", seq=seq) == {
        "cmd": "APPMANAGER_LOG",
        "seq": seq,
        "request": "GET /some/path?a=1 HTTP/1.1",
        "status": 200,
        "bytes": len(body),
        "referer": "http://ref.test/page",
        "user_agent": "tester/1.0",
    }
    # A keep-alive request goes straight to Node; it is reported all the same.
    client.send(http_request("/second", method="POST", body=b"x" * 10))
    second = client.read().body
    log = shim.expect("APPMANAGER_LOG", seq=seq)
    assert (log["request"], log["status"], log["bytes"]) == (
        "POST /second HTTP/1.1",
        200,
        len(second),
    )
    assert (log["referer"], log["user_agent"]) == (None, None)


def test_the_access_log_counts_body_bytes_without_chunk_framing(logging_echo: Shim) -> None:
    client, seq = logging_echo.hand(http_request("/app/stream"))
    assert client.read().headers["transfer-encoding"] == "chunked"
    log = logging_echo.expect("APPMANAGER_LOG", seq=seq)
    assert (log["status"], log["bytes"]) == (200, len(b"line 0\nline 1\nline 2\n"))


def test_the_access_log_counts_no_body_for_head_and_204(logging_echo: Shim) -> None:
    client, seq = logging_echo.hand(http_request("/app/pid", method="HEAD"))
    assert client.read(head_request=True).status == 200
    log = logging_echo.expect("APPMANAGER_LOG", seq=seq)
    assert (log["request"], log["status"], log["bytes"]) == ("HEAD /app/pid HTTP/1.1", 200, 0)
    client.send(http_request("/app/status?204"))
    assert client.read().status == 204
    log = logging_echo.expect("APPMANAGER_LOG", seq=seq)
    assert (log["status"], log["bytes"]) == (204, 0)


def test_the_access_log_reports_the_500_page(logging_echo: Shim) -> None:
    client, seq = logging_echo.hand(http_request("/app/raise", version="HTTP/1.0"))
    response = client.read()
    assert response.status == 500
    log = logging_echo.expect("APPMANAGER_LOG", seq=seq)
    assert (log["request"], log["status"], log["bytes"]) == (
        "GET /app/raise HTTP/1.0",
        500,
        len(response.body),
    )


def test_a_response_cut_short_is_reported_before_closed(logging_echo: Shim) -> None:
    client, seq = logging_echo.hand(http_request("/app/raise-after-head"))
    client.read_until_closed()
    logging_echo.expect("APPMANAGER_CLOSED", seq=seq)
    # Reported before the connection closed: the core knows the connection no longer after.
    log = logging_echo.expect("APPMANAGER_LOG", timeout=0, seq=seq)
    assert (log["status"], log["bytes"]) == (200, len(b"partial"))


def test_pipelined_requests_are_each_reported_in_order(logging_echo: Shim) -> None:
    client, seq = logging_echo.hand(http_request("/one") + http_request("/two"))
    client.read()
    client.read()
    first = logging_echo.expect("APPMANAGER_LOG", seq=seq)
    second = logging_echo.expect("APPMANAGER_LOG", seq=seq)
    assert [first["request"], second["request"]] == ["GET /one HTTP/1.1", "GET /two HTTP/1.1"]


def test_the_access_log_has_the_url_as_received_under_a_base_uri(spawn: Spawn) -> None:
    shim, answer = spawn(ECHO_APP.parent, base_uri="/sub", access_log=True)
    assert answer["cmd"] == "APPMANAGER_READY"
    client, seq = shim.hand(http_request("/sub/x?y=1"))
    assert client.read().json()["url"] == "/x?y=1"
    assert shim.expect("APPMANAGER_LOG", seq=seq)["request"] == "GET /sub/x?y=1 HTTP/1.1"


def test_nothing_is_reported_without_the_access_log(echo: Shim) -> None:
    client, seq = echo.hand(http_request("/app/stream"))
    client.read()
    client.client.close()
    echo.expect("APPMANAGER_CLOSED", seq=seq)
    echo.closed_messages()
    assert [m for m in echo.inbox if m.get("cmd") == "APPMANAGER_LOG"] == []


# Stopping


def test_eof_on_the_channel_exits_0_quickly(spawn: Spawn) -> None:
    shim, answer = spawn(ECHO_APP.parent)
    assert answer["cmd"] == "APPMANAGER_READY"
    idle, _ = shim.hand(http_request())
    idle.read()
    started = time.monotonic()
    shim.control.shutdown(socket.SHUT_RDWR)
    assert shim.wait_exit() == 0
    assert time.monotonic() - started < 2
    assert idle.closed_by_peer()


def test_eof_before_the_spawn_message_exits_1(tmp_path: Path) -> None:
    shim = start_shim(tmp_path)
    try:
        shim.control.shutdown(socket.SHUT_RDWR)
        assert shim.wait_exit() == 1
    finally:
        shim.stop()


def test_eof_lets_a_request_in_flight_finish(spawn: Spawn) -> None:
    shim, answer = spawn(ECHO_APP.parent)
    assert answer["cmd"] == "APPMANAGER_READY"
    client, _ = shim.hand(http_request("/app/sleep?0.3"))
    time.sleep(0.05)
    shim.control.shutdown(socket.SHUT_RDWR)
    response = client.read()
    assert response.body == str(shim.process.pid).encode()
    assert response.headers["connection"] == "close"
    assert shim.wait_exit() == 0


def test_sigterm_while_idle_exits_0_promptly(spawn: Spawn) -> None:
    shim, answer = spawn(ECHO_APP.parent)
    assert answer["cmd"] == "APPMANAGER_READY"
    started = time.monotonic()
    shim.process.send_signal(signal.SIGTERM)
    assert shim.wait_exit() == 0
    assert time.monotonic() - started < 2


def test_sigterm_finishes_requests_in_flight(spawn: Spawn) -> None:
    shim, answer = spawn(ECHO_APP.parent)
    assert answer["cmd"] == "APPMANAGER_READY"
    idle, idle_seq = shim.hand(http_request())
    idle.read()
    client, seq = shim.hand(http_request("/app/sleep?0.3"))
    time.sleep(0.05)
    shim.process.send_signal(signal.SIGTERM)
    # The idle connection closes at once; the busy one after its response.
    assert idle.closed_by_peer(timeout=0.25)
    shim.expect("APPMANAGER_CLOSED", seq=idle_seq)
    response = client.read()
    assert response.status == 200
    assert response.headers["connection"] == "close"
    assert client.closed_by_peer()
    shim.expect("APPMANAGER_CLOSED", seq=seq)
    assert shim.wait_exit() == 0


def test_sigint_is_ignored(echo: Shim) -> None:
    echo.process.send_signal(signal.SIGINT)
    assert echo.request(http_request()).status == 200
    assert echo.process.poll() is None


# Express


@needs_express
def test_express_json_form_params_and_query(express: Shim) -> None:
    assert express.request(http_request("/shop/")).json()["hello"] == "express"
    payload = json.dumps({"name": "widget", "tags": ["a", "b"]}).encode()
    response = express.request(
        http_request(
            "/shop/json",
            ("Content-Type", "application/json"),
            method="POST",
            body=payload,
        )
    )
    assert response.status == 201
    assert response.json() == {"received": {"name": "widget", "tags": ["a", "b"]}}
    form = b"name=widget&colour=blue+green"
    response = express.request(
        http_request(
            "/shop/form",
            ("Content-Type", "application/x-www-form-urlencoded"),
            method="POST",
            body=form,
        )
    )
    assert response.json() == {"received": {"name": "widget", "colour": "blue green"}}
    response = express.request(http_request("/shop/users/42?sort=asc"))
    assert response.json() == {"id": "42", "query": {"sort": "asc"}}


@needs_express
def test_express_sees_the_full_url_as_original_url(express: Shim) -> None:
    data = express.request(http_request("/shop/info?x=1"), scheme="https").json()
    assert data["url"] == "/info?x=1"
    assert data["originalUrl"] == "/shop/info?x=1"
    assert data["path"] == "/info"
    assert data["protocol"] == "https"
    assert data["secure"] is True
    assert data["ip"] == "127.0.0.1"


@needs_express
def test_express_streaming_404_and_errors(express: Shim) -> None:
    client, _ = express.hand(http_request("/shop/stream"))
    response = client.read()
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.body == b"chunk 0\nchunk 1\nchunk 2\n"
    client.send(http_request("/shop/nowhere"))
    assert client.read().status == 404
    client.send(http_request("/shop/error"))
    response = client.read()
    assert (response.status, response.json()) == (500, {"error": "express error route"})
    client.send(http_request("/shop/throw"))
    response = client.read()
    assert (response.status, response.json()) == (500, {"error": "express route threw"})
    assert express.process.poll() is None
