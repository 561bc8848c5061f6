"""Shared test machinery: a real appmanager server on a free port, a raw HTTP client, and a check
that every test leaves no process behind."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"
PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    """Orphaned app processes (whose core died) get re-parented to the test runner, so the leak
    check below sees them instead of losing them to init."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except OSError:
        pass


_become_subreaper()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    version: str = "HTTP/1.1"

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


class HttpReader:
    """Reads HTTP responses off a socket, one at a time (keep-alive and pipelining)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"connection closed mid-line: {self.buf[:200]!r}")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read(self, head_only: bool = False) -> Response:
        while True:
            status_line = self._line()
            version, code, *rest = status_line.decode("latin-1").split(" ", 2)
            headers: list[tuple[str, str]] = []
            while True:
                line = self._line()
                if not line:
                    break
                name, _, value = line.decode("latin-1").partition(":")
                headers.append((name.strip(), value.strip()))
            if int(code) != 100:
                break
        resp = Response(int(code), rest[0] if rest else "", headers, b"", version)
        if head_only or int(code) in (204, 304):
            return resp
        te = resp.header("Transfer-Encoding")
        length = resp.header("Content-Length")
        if te and "chunked" in te.lower():
            body = b""
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():
                        pass
                    break
                while len(self.buf) < size + 2:
                    if not self._fill():
                        raise ConnectionError("closed inside a chunk")
                body += self.buf[:size]
                self.buf = self.buf[size + 2 :]
            resp.body = body
        elif length is not None:
            n = int(length)
            while len(self.buf) < n:
                if not self._fill():
                    raise ConnectionError(f"closed after {len(self.buf)} of {n} body bytes")
            resp.body, self.buf = self.buf[:n], self.buf[n:]
        else:
            while self._fill():
                pass
            resp.body, self.buf = self.buf, b""
        return resp


def connect(port: int, timeout: float = 15.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock


def request(port: int, raw: bytes, *, timeout: float = 15.0, head_only: bool = False) -> Response:
    """Send raw request bytes on a new connection and read one response."""
    with connect(port, timeout) as sock:
        sock.sendall(raw)
        return HttpReader(sock).read(head_only=head_only)


def get(port: int, path: str = "/", headers: str = "", **kw: object) -> Response:
    raw = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n"
    return request(port, raw.encode(), **kw)  # type: ignore[arg-type]


@dataclass
class Server:
    """One `appmanager start` process under test."""

    proc: subprocess.Popen[str]
    port: int
    instance_dir: Path
    log_path: Path
    banner: str = ""
    app_pids: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def preloader_pids(self) -> set[int]:
        """Preloaders (smart spawning) of this server, from their fixed log line."""
        return {int(pid) for pid in re.findall(r"preloader (\d+) of app", self.log())}

    def app_processes(self) -> list[psutil.Process]:
        """The processes serving requests: the core's descendants but its preloaders."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        preloaders = self.preloader_pids()
        return [p for p in children if p.pid not in preloaders]

    def wait_for_log(self, text: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in log:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not stop:\n{self.log()[-3000:]}") from None


def start_server(
    app_dir: str | Path | None,
    *args: str,
    tmp_path: Path,
    env: dict[str, str] | None = None,
    wait: bool = True,
    timeout: float = 60.0,
) -> Server:
    port = free_port()
    instance = tmp_path / f"instance-{port}"
    log_path = tmp_path / f"server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "appmanager",
        "start",
        *([] if app_dir is None else [str(app_dir)]),
        "--port",
        str(port),
        "--instance-dir",
        str(instance),
        "--log-file",
        str(log_path),
        *args,
    ]
    if os.geteuid() == 0 and "--user-switching" not in args:
        # As root (CI), apps would run as their owner or nobody, which cannot reach the test's
        # private temporary directories; tests of user switching turn it on themselves.
        cmd += ["--user-switching", "off"]
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        start_new_session=True,
    )
    server = Server(proc, port, instance, log_path)
    if not wait:
        return server
    deadline = time.monotonic() + timeout
    lines = []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Serving"):
            server.banner = "".join(lines)
            server.app_pids = {p.pid for p in server.app_processes()}
            return server
    proc.kill()
    proc.wait()
    proc.stdout.close()
    log = log_path.read_text() if log_path.exists() else ""
    raise AssertionError(f"server did not start: {''.join(lines)}\n{log[-3000:]}")


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[object]:
    """Start servers with ``server_factory(app_dir, *args)``; all are stopped after the test."""
    servers: list[Server] = []

    def factory(app_dir: str | Path | None, *args: str, **kw: object) -> Server:
        server = start_server(app_dir, *args, tmp_path=tmp_path, **kw)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield factory
    for server in servers:
        if server.proc.poll() is None:
            server.stop()
        if server.proc.stdout is not None:
            server.proc.stdout.close()


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves a process behind (the runner is a subreaper, so orphans of a dead
    core are counted too)."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    deadline = time.monotonic() + 5
    while True:
        new = [
            p
            for p in psutil.Process().children(recursive=True)
            if p.pid not in before and not _descends_from(p, before)
        ]
        left = [p for p in new if _alive(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    described = [(p.pid, _cmdline(p)) for p in left]
    for p in new:
        # Kill what was left, and reap zombies re-parented to the runner (it is their subreaper).
        try:
            p.kill()
            if p.ppid() == os.getpid():
                os.waitpid(p.pid, 0)
        except (psutil.Error, ChildProcessError):
            pass
    assert not left, f"processes left behind: {described}"


def _descends_from(p: psutil.Process, pids: set[int]) -> bool:
    """Is ``p`` a child of a process that was already running (a server shared by a module,
    which may replace its app processes during a test)?"""
    try:
        return any(parent.pid in pids for parent in p.parents())
    except psutil.Error:
        return False


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI every runtime is installed, so a test that skips there hides a missing piece: it
    fails instead. Outside CI a test may skip when a runtime is genuinely absent."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every runtime must be present: {report.longrepr}"
