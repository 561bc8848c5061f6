"""Plays the core for the Python shim's tests: starts the shim with the control channel on fd 3
and the progress file on fd 4, does the handshake, and hands it real loopback TCP connections by
SCM_RIGHTS (docs/protocol/spawn.md, handoff.md). The client's end reads what the shim writes.
A shim started as a preloader forks processes on ``Shim.fork``, each driven as a Shim too."""

from __future__ import annotations

import fcntl
import functools
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / "spawners" / "python" / "appmanager_python.py"
ECHO_ASGI = ROOT / "tests" / "apps" / "echo_asgi" / "app.py"
# The request parsers of the shim's ASGI server: httptools, and its own pure-Python one.
PARSERS = ["httptools", "python"]
# The shim runs under the app's interpreter, not the core's: APPMANAGER_TEST_PYTHON runs the tests
# against another one (the tests that need a framework want it installed there too).
SHIM_PYTHON = os.environ.get("APPMANAGER_TEST_PYTHON") or sys.executable
TIMEOUT = 10.0


@dataclass
class HTTPResponse:
    """A response as the client read it, the body de-chunked."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool

    def header(self, name: str) -> str | None:
        values = self.headers_named(name)
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None

    def headers_named(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Result:
    """What one request produced: the shim's D reply (``done``, as ``D <seq> <k|c>``; its access
    log fields apart, None when it has none) and the response the client read."""

    done: str
    response: HTTPResponse
    raw: bytes
    status: int | None = None
    size: int | None = None


def split_done(reply: str) -> tuple[str, int | None, int | None]:
    """A D reply as ``D <seq> <k|c>`` and its optional status and body size (handoff.md)."""
    fields = reply.split(" ")
    assert len(fields) in (3, 5), f"malformed D reply {reply!r}"
    assert fields[0] == "D" and fields[1].isdigit() and fields[2] in ("k", "c"), reply
    if len(fields) == 3:
        return reply, None, None
    assert fields[3].isdigit() and fields[4].isdigit(), f"malformed D reply {reply!r}"
    return " ".join(fields[:3]), int(fields[3]), int(fields[4])


def parse_response(raw: bytes, *, head_request: bool = False) -> tuple[HTTPResponse, bytes]:
    """Parses one response off the front of ``raw``; returns it and the bytes after it."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw[:200]!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, code, reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = [(n, v.strip()) for n, _, v in (line.partition(":") for line in lines)]
    response = HTTPResponse(int(code), reason, headers, b"", False)
    if head_request or response.status in (204, 304) or response.status < 200:
        return response, rest
    if (response.header("Transfer-Encoding") or "").lower() == "chunked":
        response.chunked = True
        body = bytearray()
        while True:
            size_line, sep, rest = rest.partition(b"\r\n")
            assert sep, "chunked body cut short"
            size = int(size_line, 16)
            body += rest[:size]
            assert rest[size : size + 2] == b"\r\n"
            rest = rest[size + 2 :]
            if size == 0:
                break
        response.body = bytes(body)
        return response, rest
    length = response.header("Content-Length")
    if length is not None:
        assert len(rest) >= int(length), "body shorter than Content-Length"
        response.body = rest[: int(length)]
        return response, rest[int(length) :]
    response.body = rest  # delimited by the end of the connection
    return response, b""


def http_head(
    target: str = "/",
    *headers: tuple[str, str],
    method: str = "GET",
    version: str = "HTTP/1.1",
) -> bytes:
    """A request head as a client would send it."""
    lines = [f"{method} {target} {version}", "Host: example.test:8080"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Connection:
    """A loopback TCP connection: the client's end, and the core's end that goes to the shim."""

    def __init__(self, listener: socket.socket) -> None:
        self.client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        self.server, _ = listener.accept()
        # As the core's: non-blocking, which the shim must never change.
        self.server.setblocking(False)
        self.received = bytearray()

    def pump(self) -> None:
        """Takes what the client can read now."""
        # select, not MSG_DONTWAIT: a socket in timeout mode polls before every recv.
        while select.select([self.client], [], [], 0)[0]:
            data = self.client.recv(1 << 20)
            if not data:
                return
            self.received += data

    def finish(self) -> bytes:
        """Closes the core's end and reads the client's end to EOF."""
        self.server.close()
        while data := self.client.recv(1 << 20):
            self.received += data
        self.client.close()
        return bytes(self.received)

    def reset_by_client(self) -> None:
        """The client goes away with an RST, as a browser closing a tab might."""
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.client.close()

    def close(self) -> None:
        self.client.close()
        self.server.close()


class ForkedProcess:
    """A process a preloader forked, seen from the test, which is not its parent: the preloader
    reaps it and reports its status with EXITED, unless the preloader died first and the process
    was re-parented to the test (the test runner is a child subreaper)."""

    def __init__(self, pid: int, preloader: Shim) -> None:
        self.pid = pid
        self.preloader = preloader
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit status once the process is gone and its status known, else None."""
        if self.returncode is not None:
            return self.returncode
        try:
            reaped, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            reaped = 0
        if reaped:
            self.returncode = os.waitstatus_to_exitcode(status)
        else:
            self.preloader.collect_exits()
            self.returncode = self.preloader.exited.get(self.pid)
        return self.returncode

    def alive(self) -> bool:
        """Whether the process runs: it exists and is not a zombie."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rpartition(")")[2].split()[0] != "Z"

    def wait(self, timeout: float) -> int | None:
        """Waits until the process is gone; returns its status, or None when it is gone and
        nobody is left to report it."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            gone = not os.path.exists(f"/proc/{self.pid}")
            if gone and self.preloader.process.poll() is not None:
                return self.poll()
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.02)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class WholeConnections:
    """Hands a shim whole connections with ``C`` and reads its reports (handoff.md, "Whole
    connections"): the part of playing the core that the Python and Ruby shims' tests share.
    A ``Shim`` dataclass mixes it in; it has the fields and methods declared here."""

    seq: int
    control: socket.socket
    progress_path: Path
    replies: list[str]

    def connect(self) -> Connection:
        raise NotImplementedError

    def log(self) -> str:
        raise NotImplementedError

    def hand_connection(
        self,
        connection: Connection,
        data: bytes,
        *,
        slot: int = 0,
        scheme: str = "http",
        in_file: bool = False,
    ) -> int:
        """Hands a whole connection to the shim with ``C``, with ``data`` as the bytes the core
        read from it (handoff.md, "Whole connections"); returns its seq. As the core does, the
        slot says request 1 has arrived first."""
        self.seq += 1
        with open(self.progress_path, "r+b") as f:
            f.seek(8 + 8 * slot)
            f.write(struct.pack("<Q", 1 << 2 | 1))
        fds = [connection.server.fileno()]
        inline = data
        data_fd = -1
        if in_file:
            data_fd = os.memfd_create("data")
            os.write(data_fd, data)
            fds.append(data_fd)
            inline = b""
        line = (
            f"C {self.seq} {slot} {'F' if in_file else '-'} 192.0.2.7 54321 127.0.0.1 8000 "
            f"{scheme} {len(data)}\n"
        ).encode()
        try:
            socket.send_fds(self.control, [line + inline], fds)
        finally:
            if data_fd >= 0:
                os.close(data_fd)
        # The shim holds the connection now; the core keeps its copy, as the test does.
        return self.seq

    def next_report(self, connections: Sequence[Connection] = ()) -> str:
        """The next message on the control channel (X, N, L, D; S, B, R), reading the clients' ends
        meanwhile so that responses cannot stall."""
        message = self.receive(connections, time.monotonic() + TIMEOUT)
        if message is None:
            raise AssertionError(f"no message within {TIMEOUT} s:\n{self.log()}")
        return message

    def receive(self, connections: Sequence[Connection], deadline: float) -> str | None:
        """The next message on the control channel, kept in ``replies`` too, or None if none
        came by ``deadline``; the clients' ends are read meanwhile."""
        while time.monotonic() < deadline:
            readable: list[Any] = [self.control]
            readable += [c.client for c in connections if c.client.fileno() != -1]
            ready, _, _ = select.select(readable, [], [], 0.5)
            for connection in connections:
                if connection.client in ready:
                    connection.pump()
            if self.control in ready:
                message = self.control.recv(1 << 16).decode("latin-1")
                self.replies.append(message)
                return message
        return None

    def wait_report(self, prefix: str, connections: Sequence[Connection] = ()) -> str:
        """The next message starting with ``prefix`` (others are kept in ``replies``)."""
        while True:
            message = self.next_report(connections)
            if message.startswith(prefix):
                return message

    def slot(self, slot: int) -> tuple[int, int]:
        """A connection's slot: the request number and its state (0 idle, 1 received, 2
        responding)."""
        data = self.progress_path.read_bytes()[8 + 8 * slot : 16 + 8 * slot]
        value: int = struct.unpack("<Q", data)[0]
        return value >> 2, value & 3


class Client:
    """The client's end of a handed-over connection: sends bytes, reads whole responses."""

    def __init__(self, connection: Connection) -> None:
        self.sock = connection.client
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, *, head_request: bool = False) -> HTTPResponse:
        while True:
            if b"\r\n\r\n" in self.buf:
                try:
                    response, rest = parse_response(self.buf, head_request=head_request)
                except AssertionError:
                    pass  # the body is not all here yet
                else:
                    if response.header("Content-Length") is not None or response.chunked:
                        self.buf = rest
                        return response
                    if head_request or response.status in (100, 204, 304):
                        self.buf = rest
                        return response
            data = self.sock.recv(1 << 20)
            if not data:
                response, rest = parse_response(self.buf, head_request=head_request)
                self.buf = rest
                return response
            self.buf += data

    def read_interim(self) -> bytes:
        """An interim (1xx) response's head."""
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(1 << 16)
            assert data, "closed before the interim response"
            self.buf += data
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        return head

    def at_eof(self) -> bool:
        """Whether the server closed the connection (after whatever is still to read); the
        client then closes its end, which ends the server's linger."""
        self.sock.settimeout(TIMEOUT)
        while data := self.sock.recv(1 << 16):
            self.buf += data
        self.sock.close()
        return True


def get(path: str, *headers: str, method: str = "GET", version: str = "HTTP/1.1") -> bytes:
    """A request head as a client sends it; ``headers`` as ``"Name: value"`` lines."""
    lines = [f"{method} {path} {version}", "Host: example.test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def hand(
    shim: WholeConnections, first: bytes, *, slot: int = 0, **kw: Any
) -> tuple[Connection, Client, int]:
    """A new connection handed over with ``first`` as the bytes already read."""
    connection = shim.connect()
    seq = shim.hand_connection(connection, first, slot=slot, **kw)
    return connection, Client(connection), seq


def closed_report(shim: WholeConnections, seq: int, connections: list[Connection]) -> int:
    """Waits for the X of connection ``seq``; returns its request count."""
    message = shim.wait_report(f"X {seq} ", connections)
    return int(message.split(" ")[2])


def assert_refused_after_a_good_request(
    shim: WholeConnections, request_bytes: bytes, status: int
) -> None:
    """On a connection that served a request, ``request_bytes`` get ``status`` and the connection
    closes, as the core would refuse them."""
    connection, client, seq = hand(shim, get("/conformance?first"))
    assert client.read().json()["query"] == "first"
    client.send(request_bytes)
    response = client.read()
    assert response.status == status
    assert response.header("connection") == "close"
    assert client.at_eof()
    # The refused request is not counted, as the core counts none it refuses.
    assert closed_report(shim, seq, [connection]) == 1


def reports_until(shim: WholeConnections, prefix: str) -> list[str]:
    """The shim's messages up to the first that starts with ``prefix``, that one included."""
    messages: list[str] = []
    while True:
        message = shim.next_report()
        assert message, f"control channel closed before {prefix!r} came: {messages}\n{shim.log()}"
        messages.append(message)
        if message.startswith(prefix):
            return messages


def counted(messages: list[str]) -> int:
    """The requests that ``N``, ``X`` and ``B`` messages report, added up."""
    total = 0
    for message in messages:
        fields = message.partition("\n")[0].split(" ")
        if fields[0] == "N":
            total += int(fields[1])
        elif fields[0] in ("X", "B"):
            total += int(fields[2])
    return total


def wait_slot(shim: WholeConnections, slot: int, expected: tuple[int, int]) -> None:
    """Waits for a slot to say ``expected``: the shim writes it once the response's last byte is
    out, which the client may read first."""
    deadline = time.monotonic() + TIMEOUT
    while shim.slot(slot) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert shim.slot(slot) == expected


@dataclass
class Shim(WholeConnections):
    """A running shim process and the core's ends of its channels; for a preloader, the
    processes it forked and the exits it reported."""

    process: subprocess.Popen[bytes] | ForkedProcess
    control: socket.socket
    progress_path: Path
    log_path: Path
    listener: socket.socket
    seq: int = 0
    connections: list[Connection] = field(default_factory=list)
    fork_seq: int = 0
    forked: list[Shim] = field(default_factory=list)
    # EXITED as a preloader reported it: pid -> status.
    exited: dict[int, int] = field(default_factory=dict)
    # Every D reply as it came, access log fields included (send and wait_* return them without).
    replies: list[str] = field(default_factory=list)

    def handshake(self, **overrides: Any) -> tuple[str, dict[str, Any]]:
        """Sends SPAWN; returns the answer's tag and payload."""
        config = {"protocol": 1, "app_type": "wsgi", "callables": ["application", "app"]}
        config.update(overrides)
        self.control.send(b"SPAWN " + json.dumps(config).encode())
        return self.answer()

    def answer(self) -> tuple[str, dict[str, Any]]:
        """Reads one handshake message (a forked process's READY or ERROR, say): tag and
        payload."""
        tag, _, payload = self.control.recv(1 << 20).partition(b" ")
        return tag.decode(), json.loads(payload)

    def fork(self) -> Shim:
        """Has a preloader fork a process, as the core does: FORK with a new control channel
        and progress file, then FORKED. The new process's READY is still to be read (answer)."""
        self.fork_seq += 1
        seq = self.fork_seq
        core_end, process_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        core_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        core_end.settimeout(TIMEOUT)
        progress_path = self.progress_path.with_name(f"progress-{seq}")
        progress_path.write_bytes(bytes(8 + 8 * 64))
        progress_fd = os.open(progress_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            command = b"FORK " + json.dumps({"seq": seq}).encode()
            socket.send_fds(self.control, [command], [process_end.fileno(), progress_fd])
        finally:
            process_end.close()
            os.close(progress_fd)
        tag, payload = self.next_message()
        assert (tag, payload.get("seq")) == ("FORKED", seq), f"{tag} {payload}:\n{self.log()}"
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(TIMEOUT)
        process = ForkedProcess(payload["pid"], self)
        child = Shim(process, core_end, progress_path, self.log_path, listener)
        self.forked.append(child)
        return child

    def next_message(self) -> tuple[str, dict[str, Any]]:
        """A preloader's next message other than EXITED; the EXITED before it are recorded."""
        while True:
            tag, payload = self.answer()
            if tag != "EXITED":
                return tag, payload
            self.exited[payload["pid"]] = payload["status"]

    def wait_exited(self, pid: int) -> int:
        """Reads a preloader's messages until it reports ``pid`` exited; returns the status."""
        while pid not in self.exited:
            tag, payload = self.answer()
            assert tag == "EXITED", f"{tag} {payload}"
            self.exited[payload["pid"]] = payload["status"]
        return self.exited[pid]

    def collect_exits(self) -> None:
        """Records the EXITED messages a preloader has sent, without waiting for more."""
        while self.control.fileno() != -1 and select.select([self.control], [], [], 0)[0]:
            message = self.control.recv(1 << 20)
            if not message:
                return
            tag, _, payload = message.partition(b" ")
            assert tag == b"EXITED", message
            data = json.loads(payload)
            self.exited[data["pid"]] = data["status"]

    def connect(self) -> Connection:
        connection = Connection(self.listener)
        self.connections.append(connection)
        return connection

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
        body_fd = -1
        if body_file is not None:
            body_fd = os.open(body_file, os.O_RDWR)
            # Like the core after writing it: the shared offset is at the end, not at 0.
            os.lseek(body_fd, 0, os.SEEK_END)
        try:
            self.submit(connection, head, body, flags=flags, body_fd=body_fd, scheme=scheme)
            done = self.wait_done(connection)
            if body_file is not None:
                assert os.lseek(body_fd, 0, os.SEEK_CUR) == body_file.stat().st_size
        finally:
            if body_fd >= 0:
                os.close(body_fd)
        return done

    def submit(
        self,
        connection: Connection,
        head: bytes,
        body: bytes = b"",
        *,
        flags: str = "K",
        body_fd: int = -1,
        scheme: str = "http",
    ) -> int:
        """Hands one request to the shim without waiting for its D; returns its seq."""
        self.seq += 1
        fds = [connection.server.fileno()]
        inline = body
        if body_fd >= 0:
            flags = flags.replace("-", "") + "F"
            fds.append(body_fd)
            inline = b""
        line = (
            f"Q {self.seq} {flags or '-'} 192.0.2.7 54321 127.0.0.1 8000 {scheme} "
            f"{len(head)} {len(body)}\n"
        ).encode()
        socket.send_fds(self.control, [line + head + inline], fds)
        return self.seq

    def wait_done(self, connection: Connection) -> str:
        """Reads the client's end while waiting for the D reply, so big responses cannot stall."""
        return self.wait_replies(1, [connection])[0]

    def last_done(self) -> tuple[str, int | None, int | None]:
        """The last D reply, split: ``D <seq> <k|c>``, status and body size (None: not sent)."""
        return split_done(self.replies[-1])

    def wait_replies(self, count: int, connections: list[Connection]) -> list[str]:
        """Waits for ``count`` D replies, in the order they come, reading the clients' ends;
        returns them as ``D <seq> <k|c>`` (all of each is kept in ``replies``)."""
        deadline = time.monotonic() + TIMEOUT
        replies: list[str] = []
        while len(replies) < count:
            reply = self.receive(connections, deadline)
            if reply is None:
                raise AssertionError(
                    f"{replies} of {count} D replies within {TIMEOUT} s:\n{self.log()}"
                )
            replies.append(split_done(reply)[0])
        return replies

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
        head_request = head.startswith(b"HEAD ")
        response, rest = parse_response(raw, head_request=head_request)
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
        for child in self.forked:
            child.stop()
        for connection in self.connections:
            connection.close()
        self.control.close()
        self.listener.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(TIMEOUT)


def start_shim(directory: Path, extra_env: dict[str, str] | None = None) -> Shim:
    """Starts the shim the way the core does: fds 3 and 4, its own session, app root as cwd."""
    core_end, shim_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # The core raises its send buffer so that a 256 KiB inline body fits in one message.
    core_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    progress_path = directory / "progress"
    # The seq of the Q path, then 64 connection slots (the core's file has more).
    progress_path.write_bytes(bytes(8 + 8 * 64))
    progress_fd = os.open(progress_path, os.O_RDWR | os.O_CLOEXEC)
    log_path = directory / "shim.log"
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
    env.update(
        APPMANAGER_CONTROL_FD="3",
        APPMANAGER_PROGRESS_FD="4",
        APPMANAGER_ENV="production",
        WSGI_ENV="production",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra_env or {})
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [SHIM_PYTHON, str(SHIM)],
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


def start_asgi_echo(directory: Path, parser: str, **config: Any) -> Shim:
    """A shim on a copy of apps/echo_asgi in ``directory``, parsing requests with ``parser``
    (httptools, or the shim's own: ``python``), that answered READY and takes connections."""
    directory.mkdir()
    shutil.copy(ECHO_ASGI, directory / "app.py")
    shim = start_shim(directory, {"APPMANAGER_PYTHON_HTTP_PARSER": parser})
    try:
        tag, payload = shim.handshake(
            app_root=str(directory),
            startup_file=str(directory / "app.py"),
            app_type="python",
            **config,
        )
        assert tag == "READY", f"{payload}\n{shim.log()}"
        assert payload["connections"] is True
    except BaseException:
        shim.stop()
        raise
    return shim


def spawning_asgi_echo(tmp_path: Path, parser: str) -> Iterator[Callable[..., Any]]:
    """The body of a ``spawn`` fixture for shims on the ASGI echo app with ``parser``."""
    if parser == "httptools":
        pytest.importorskip("httptools")
    yield from spawning(tmp_path, functools.partial(start_asgi_echo, parser=parser))


def spawning(tmp_path: Path, start: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """The body of a ``spawn`` fixture: ``spawn(**config)`` is ``start(directory, **config)``
    with a new directory under tmp_path; every shim started is stopped afterwards."""
    shims: list[Any] = []

    def spawn(**config: Any) -> Any:
        shim = start(tmp_path / f"shim{len(shims)}", **config)
        shims.append(shim)
        return shim

    try:
        yield spawn
    finally:
        for shim in shims:
            shim.stop()


def spawner(tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[Any]:
    """The body of a ``spawn`` fixture: ``spawn(files, startup, **config)`` starts a shim on app
    files written under tmp_path and does the handshake; every shim is stopped afterwards."""
    shims: list[Shim] = []

    def spawn(
        files: dict[str, str], startup: str, **config: Any
    ) -> tuple[Shim, str, dict[str, Any]]:
        root = tmp_path / f"app{len(shims)}"
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(textwrap.dedent(text))
        shim = start_shim(root, env)
        shims.append(shim)
        config = {"app_root": str(root), "startup_file": str(root / startup), **config}
        tag, payload = shim.handshake(**config)
        return shim, tag, payload

    try:
        yield spawn
    finally:
        for shim in shims:
            shim.stop()


def reports_until_exit(shim: WholeConnections) -> list[str]:
    """Every message the shim sends until it closes the control channel (exits)."""
    messages: list[str] = []
    while message := shim.next_report():
        messages.append(message)
    return messages


def given_back(messages: list[str]) -> dict[int, bytes]:
    """The connections that ``B`` messages gave back: seq -> the bytes read and not served."""
    back: dict[int, bytes] = {}
    for message in messages:
        if message.startswith("B "):
            head, _, data = message.partition("\n")
            _, seq, requests = head.split(" ")
            assert requests.isdigit(), message
            assert int(seq) not in back, f"connection {seq} given back twice: {messages}"
            back[int(seq)] = data.encode("latin-1")
    return back


def closed(messages: list[str]) -> set[int]:
    """The connections that ``X`` messages closed."""
    return {int(m.split(" ")[1]) for m in messages if m.startswith("X ")}


def assert_the_cores_again(connection: Connection, client: Client, unread: bytes) -> None:
    """The shim let go of the connection without shutdown and reads it no more: ``unread``, sent
    by the client after the give-back, was neither answered nor read and waits in the core's copy,
    which still carries bytes both ways."""
    time.sleep(0.3)
    assert client.buf == b""
    assert not select.select([client.sock], [], [], 0)[0], "answered or shut down after B"
    try:
        data = connection.server.recv(1 << 16)
    except BlockingIOError:
        data = b""
    assert data == unread, "the shim read the connection after giving it back"
    connection.server.sendall(b"from the core")
    assert client.sock.recv(1 << 16) == b"from the core"


def stop(shim: WholeConnections, how: str) -> None:
    """Stops the shim as the core does: EOF on the control channel, or SIGTERM."""
    if how == "eof":
        shim.control.shutdown(socket.SHUT_WR)
    else:
        shim.process.send_signal(signal.SIGTERM)
