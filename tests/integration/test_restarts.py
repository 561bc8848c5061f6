"""Restarts without losing a request: under steady load from many clients, each kind of restart of
a Python (WSGI and ASGI), a Ruby and a Node app fails zero requests and leaves no old process
behind; so does a graceful stop."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import APPS, HttpReader, get

CLIENTS = 8


class Clients:
    """CLIENTS threads running ``_client`` until stopped; subclasses count what they see."""

    join_timeout = 60.0

    def start(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.join_timeout)

    def _client(self) -> None:
        raise NotImplementedError


@dataclass
class Load(Clients):
    """Clients that send requests in a loop on keep-alive connections until stopped.

    A request that gets no answer on a connection that had served others is sent again on a new
    connection, as HTTP clients do (RFC 9112 9.3.1: the server may close an idle connection),
    unless ``retry`` is off; any other error, and any status but 200, is a failure.
    ``closed_by_server`` counts the responses that closed their connection.
    """

    port: int
    path: str
    retry: bool = True
    ok: int = 0
    retried: int = 0
    closed_by_server: int = 0
    failures: list[str] = field(default_factory=list)
    pids: set[str] = field(default_factory=set)

    join_timeout = 30.0

    def _client(self) -> None:
        sock: socket.socket | None = None
        reader: HttpReader | None = None
        served_on_sock = 0
        deadline = time.monotonic() + 60  # bounded whatever happens
        while not self._stop.is_set() and time.monotonic() < deadline:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=20)
                reader = HttpReader(sock)
                served_on_sock = 0
            assert reader is not None
            try:
                sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                resp = reader.read()
            except (ConnectionError, OSError) as exc:
                sock.close()
                sock = None
                if served_on_sock and self.retry:
                    with self._lock:
                        self.retried += 1
                    continue
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            served_on_sock += 1
            with self._lock:
                if resp.status == 200:
                    self.ok += 1
                    self.pids.add(resp.body.decode().strip())
                else:
                    self.failures.append(f"status {resp.status}: {resp.body[:100]!r}")
            if (resp.header("Connection") or "").lower() == "close":
                with self._lock:
                    self.closed_by_server += 1
                sock.close()
                sock = None
        if sock is not None:
            sock.close()


APPS_BY_LANGUAGE = {
    "python": "wsgi_echo",
    # ASGI processes take whole connections: a restart gives them back to the core.
    "asgi": "echo_asgi",
    "ruby": "echo_rack",
    "node": "echo_node",
}


def copy_app(tmp_path: Path, language: str) -> Path:
    app = tmp_path / language
    shutil.copytree(APPS / APPS_BY_LANGUAGE[language], app, symlinks=True)
    (app / "tmp").mkdir(exist_ok=True)
    return app


def old_pids_gone(server, old: set[int], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = {p.pid for p in server.app_processes()}
        if not current & old:
            return True
        time.sleep(0.1)
    return False


def restart_with(kind: str, server, app: Path) -> None:
    if kind == "restart.txt":
        (app / "tmp" / "restart.txt").touch()
    elif kind == "command":
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "appmanager",
                "restart",
                "--instance-dir",
                str(server.instance_dir),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    else:
        os.kill(server.proc.pid, signal.SIGHUP)


def restart_under(load: Load, kind: str, server, app: Path) -> None:
    """Restarts the app ``kind``'s way while ``load`` runs, from before the restart begins until
    after it finished."""
    load.start()
    try:
        time.sleep(0.7)
        restart_with(kind, server, app)
        server.wait_for_log("restart finished", timeout=30)
        time.sleep(0.7)
    finally:
        load.stop()


def assert_restarted_failing_nothing(load: Load, server, old: set[int]) -> set[int]:
    """Every request of ``load`` was answered, the processes ``old`` are gone and new ones serve;
    returns the new ones."""
    assert not load.failures, load.failures[:5]
    assert load.ok > 50
    assert old_pids_gone(server, old), "old processes are still running"
    new = {p.pid for p in server.app_processes()}
    assert new and not new & old
    assert get(server.port, "/app/pid").status == 200
    return new


@pytest.mark.parametrize("language", list(APPS_BY_LANGUAGE))
@pytest.mark.parametrize("kind", ["restart.txt", "command", "SIGHUP"])
def test_restart_under_load_fails_no_request(server_factory, tmp_path, language, kind) -> None:
    app = copy_app(tmp_path, language)
    server = server_factory(app, "--min-instances", "2", "--max-pool-size", "6")
    old = {p.pid for p in server.app_processes()}
    load = Load(server.port, "/app/pid")
    restart_under(load, kind, server, app)
    assert_restarted_failing_nothing(load, server, old)


def test_blocking_restart_makes_requests_wait_but_fails_none(server_factory, tmp_path) -> None:
    app = copy_app(tmp_path, "python")
    server = server_factory(app, "--min-instances", "2", "--rolling-restarts", "off")
    old = {p.pid for p in server.app_processes()}
    load = Load(server.port, "/app/pid")
    load.start()
    try:
        time.sleep(0.5)
        (app / "tmp" / "restart.txt").touch()
        server.wait_for_log("restart finished", timeout=30)
        time.sleep(0.5)
    finally:
        load.stop()
    assert not load.failures, load.failures[:5]
    assert old_pids_gone(server, old)


def test_always_restart_txt_reloads_before_each_request(server_factory, tmp_path) -> None:
    app = copy_app(tmp_path, "python")
    server = server_factory(app, "-e", "development")
    (app / "tmp" / "always_restart.txt").touch()
    time.sleep(1.5)  # the file is looked for about once a second
    pids = {get(server.port, "/app/pid", timeout=30).body for _ in range(3)}
    assert len(pids) == 3, "each request must be served by a freshly started process"
    (app / "tmp" / "always_restart.txt").unlink()
    time.sleep(1.5)
    steady = {get(server.port, "/app/pid").body for _ in range(3)}
    assert len(steady) == 1


def test_restart_dir_option(server_factory, tmp_path) -> None:
    app = copy_app(tmp_path, "python")
    elsewhere = tmp_path / "signals"
    elsewhere.mkdir()
    server = server_factory(app, "--restart-dir", str(elsewhere))
    old = {p.pid for p in server.app_processes()}
    (elsewhere / "restart.txt").touch()
    server.wait_for_log("restart finished", timeout=30)
    assert old_pids_gone(server, old)


def test_broken_deploy_keeps_the_old_version_serving(server_factory, tmp_path) -> None:
    app = copy_app(tmp_path, "python")
    server = server_factory(app, "--min-instances", "2")
    old = {p.pid for p in server.app_processes()}
    (app / "passenger_wsgi.py").write_text("raise RuntimeError('the new deploy is broken')\n")
    load = Load(server.port, "/app/pid")
    load.start()
    try:
        (app / "tmp" / "restart.txt").touch()
        server.wait_for_log("restart failed, old processes keep serving", timeout=30)
        time.sleep(0.5)
    finally:
        load.stop()
    assert not load.failures, load.failures[:5]
    assert "the new deploy is broken" in server.log()
    # The old version answers on; the error shows in the status for the operator.
    assert get(server.port, "/app/pid").status == 200
    status = subprocess.run(
        [sys.executable, "-m", "appmanager", "status", "--instance-dir", str(server.instance_dir)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "failed to start: LOAD_APP failed" in status.stdout
    assert old & {p.pid for p in server.app_processes()}


@dataclass
class FreshLoad(Clients):
    """Clients that open a new connection for every request, until the server stops
    accepting: a refused connection was never accepted; anything else that is not a 200 after
    the connection was made is a failure."""

    port: int
    ok: int = 0
    refused: int = 0
    failures: list[str] = field(default_factory=list)

    def _client(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            except ConnectionRefusedError:
                with self._lock:
                    self.refused += 1
                time.sleep(0.01)
                continue
            try:
                sock.sendall(b"GET /app/sleep?0.2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                resp = HttpReader(sock).read()
                with self._lock:
                    if resp.status == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"status {resp.status}")
            except OSError as exc:
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
            finally:
                sock.close()


@pytest.mark.parametrize("app", ["wsgi_echo", "echo_asgi"])
def test_graceful_shutdown_under_load_fails_no_accepted_request(server_factory, app: str) -> None:
    server = server_factory(APPS / app, "--min-instances", "2", "--max-pool-size", "4")
    load = FreshLoad(server.port)
    load.start()
    try:
        time.sleep(1.0)
        assert server.stop() == 0
        time.sleep(0.3)
    finally:
        load.stop()
    assert not load.failures, load.failures[:5]
    assert load.ok > 10
    assert load.refused > 0  # the clients kept trying after the listener closed
