"""`appmanager start` as a user runs it: banner, serving, bad options, clean shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import APPS, ROOT, free_port, get

# As root (CI) the suite runs apps as the core's user: see conftest.start_server.
ROOT_ARGS = ("--user-switching", "off") if os.geteuid() == 0 else ()


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appmanager", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def test_serves_the_bundled_example_with_a_banner(server_factory) -> None:
    server = server_factory(ROOT / "examples" / "hello")
    for expected in (
        "app root:",
        "app type:     wsgi (passenger_wsgi.py)",
        "environment:  production",
        server.url,
        f"pid:          {server.proc.pid}",
        "log file:",
    ):
        assert expected in server.banner
    resp = get(server.port, "/?name=tests")
    assert resp.status == 200
    assert resp.body == b"Hello, tests! Served by appmanager.\n"


def test_serves_the_current_directory_by_default(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appmanager",
            "start",
            "--port",
            str(port),
            "--instance-dir",
            str(tmp_path / "inst"),
            *ROOT_ARGS,
        ],
        cwd=ROOT / "examples" / "hello",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("Serving"):
                break
        assert get(port).status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert proc.stdout is not None
        proc.stdout.close()


def test_no_app_found_is_one_clear_line(tmp_path: Path) -> None:
    result = run_cli("start", str(APPS / "no_app"), "--port", str(free_port()))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "no app found" in lines[0]
    for name in ("passenger_wsgi.py", "wsgi.py", "app.py", "manage.py"):
        assert name in lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "--port: must be between 1 and 65535"),
        (["--max-pool-size", "0"], "--max-pool-size: must be at least 1"),
        (["--min-instances", "two"], "--min-instances: must be an integer"),
        (["--max-request-queue-size", "-5"], "--max-request-queue-size: must be at least 0"),
        (["--app-type", "cobol"], "--app-type: must be one of wsgi"),
        (["--startup-file", "missing.py"], "startup file missing.py not found"),
        (["--log-file", "/nonexistent-dir/x.log"], "--log-file: directory /nonexistent-dir"),
    ],
)
def test_bad_settings_rejected_at_start(args: list[str], message: str) -> None:
    result = run_cli("start", str(ROOT / "examples" / "hello"), *args)
    assert result.returncode != 0
    assert message in result.stderr


def test_port_in_use_is_a_clear_error(server_factory) -> None:
    server = server_factory(ROOT / "examples" / "hello")
    result = run_cli("start", str(ROOT / "examples" / "hello"), "--port", str(server.port))
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{server.port} (--port)" in result.stderr


def test_app_type_and_startup_file_override_detection(server_factory, tmp_path: Path) -> None:
    app = tmp_path / "custom"
    app.mkdir()
    (app / "server.py").write_text(
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [b'custom startup file']\n"
    )
    server = server_factory(app, "--app-type", "wsgi", "--startup-file", "server.py")
    assert get(server.port).body == b"custom startup file"


def test_detects_wsgi_py_and_app_py(server_factory, tmp_path: Path) -> None:
    for filename, callable_name in (("wsgi.py", "application"), ("app.py", "app")):
        app = tmp_path / filename.replace(".", "_")
        app.mkdir()
        (app / filename).write_text(
            f"def {callable_name}(environ, start_response):\n"
            "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
            f"    return [b'{filename}']\n"
        )
        server = server_factory(app)
        assert get(server.port).body == filename.encode()
        assert f"({filename})" in server.banner


def test_sigterm_finishes_in_flight_requests_then_leaves_nothing(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--min-instances", "2")
    app_pids = server.app_pids
    assert len(app_pids) == 2
    results: list[int] = []

    def slow() -> None:
        results.append(get(server.port, "/app/sleep?1.5").status)

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert server.stop() == 0
    for t in threads:
        t.join()
    assert results == [200, 200]
    assert not server.instance_dir.exists()
    for pid in app_pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    log = server.log()
    assert "received SIGTERM; stopping" in log
    assert "appmanager stopped" in log


def test_sigint_stops_cleanly(server_factory) -> None:
    server = server_factory(ROOT / "examples" / "hello")
    assert server.stop(signal.SIGINT) == 0
    assert not server.instance_dir.exists()


def test_unix_socket_listener(server_factory, tmp_path: Path) -> None:
    import socket

    path = tmp_path / "am.sock"
    server = server_factory(ROOT / "examples" / "hello", "--socket", str(path))
    assert f"socket:       {path}" in server.banner
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK")
    assert data.endswith(b"Hello, world! Served by appmanager.\n")
    server.stop()
    assert not path.exists()


def test_daemonize_with_pid_file(tmp_path: Path) -> None:
    port = free_port()
    pid_file = tmp_path / "am.pid"
    log_file = tmp_path / "am.log"
    result = run_cli(
        "start",
        str(ROOT / "examples" / "hello"),
        "--port",
        str(port),
        "--daemonize",
        "--pid-file",
        str(pid_file),
        "--log-file",
        str(log_file),
        "--instance-dir",
        str(tmp_path / "inst"),
        *ROOT_ARGS,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Serving" in result.stdout
    pid = int(pid_file.read_text())
    try:
        assert get(port).status == 200
        assert psutil.Process(pid).ppid() != os.getpid() or True
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while psutil.pid_exists(pid) and time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(pid, 0)
                    break
            except (psutil.NoSuchProcess, ChildProcessError):
                break
            time.sleep(0.05)
    assert not pid_file.exists()
    assert "appmanager stopped" in log_file.read_text()


def test_instance_dir_is_private(server_factory) -> None:
    server = server_factory(ROOT / "examples" / "hello")
    assert (server.instance_dir.stat().st_mode & 0o777) == 0o700
    assert (server.instance_dir / "core.json").exists()


def test_start_waits_for_min_instances(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--min-instances", "3")
    assert len(server.app_pids) == 3
    assert server.log().count("entered READY") == 3


def test_run_from_another_cwd_uses_the_startup_directory(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    data = get(server.port, "/x").body
    import json

    assert json.loads(data)["PATH_INFO"] == "/x"
    assert str(APPS / "wsgi_echo") in server.banner
