"""The control plane against a real running core: status (table and JSON schema), restart, stop,
detach, top, events, several instances, and a hung core."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from conftest import APPS, get

STATUS_KEYS = {
    "version",
    "pid",
    "started_at",
    "uptime",
    "url",
    "max_pool_size",
    "process_count",
    "requests_queued",
    "apps",
}
APP_KEYS = {
    "name",
    "root",
    "type",
    "environment",
    "server_names",
    "base_uri",
    "queue",
    "spawning",
    "boot_error",
    "preloader",
    "processes",
}
PROCESS_KEYS = {
    "pid",
    "state",
    "sessions",
    "processed",
    "uptime",
    "cpu_percent",
    "rss",
    "pss",
    "uss",
    "last_used",
}


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appmanager", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def status_json(server) -> dict:
    result = cli("status", "--json", "--instance-dir", str(server.instance_dir))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_status_json_schema_and_sessions_in_flight(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--min-instances", "2")
    # Both processes ready first: on a loaded machine a request that found none ready would
    # wait, and the pool would grow a third for it.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready = [p for a in status_json(server)["apps"] for p in a["processes"]]
        if len(ready) == 2 and all(p["state"] == "READY" for p in ready):
            break
        time.sleep(0.1)
    for _ in range(3):
        get(server.port, "/app/pid")
    slow = threading.Thread(target=get, args=(server.port, "/app/sleep?2"))
    slow.start()
    time.sleep(0.5)
    status = status_json(server)
    slow.join()
    assert set(status) == STATUS_KEYS
    assert status["pid"] == server.proc.pid
    assert status["process_count"] == 2 and status["max_pool_size"] == 6
    (app,) = status["apps"]
    assert set(app) == APP_KEYS
    assert app["type"] == "wsgi" and app["environment"] == "production"
    assert len(app["processes"]) == 2
    for proc in app["processes"]:
        assert set(proc) == PROCESS_KEYS
        assert proc["state"] == "READY"
        assert proc["rss"] > 0 and proc["uss"] > 0
    assert sum(p["sessions"] for p in app["processes"]) == 1
    assert sum(p["processed"] for p in app["processes"]) >= 3


def test_status_table(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    result = cli("status", "--instance-dir", str(server.instance_dir))
    assert result.returncode == 0
    out = result.stdout
    assert f"pid {server.proc.pid}" in out
    assert "pool: 1 of 6 processes, 0 requests queued" in out
    assert "PID" in out and "STATE" in out and "PROCESSED" in out and "USS" in out
    pid = next(iter(server.app_pids))
    assert any(line.split()[:2] == [str(pid), "READY"] for line in out.splitlines())


def test_status_finds_the_only_instance_and_lists_several(server_factory, tmp_path: Path) -> None:
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    first = server_factory(APPS / "wsgi_echo", env={"XDG_RUNTIME_DIR": str(tmp_path)})
    alone = subprocess.run(
        [sys.executable, "-m", "appmanager", "status"], capture_output=True, text=True, env=env
    )
    assert alone.returncode == 0 and f"pid {first.proc.pid}" in alone.stdout
    second = server_factory(APPS / "wsgi_echo", env={"XDG_RUNTIME_DIR": str(tmp_path)})
    both = subprocess.run(
        [sys.executable, "-m", "appmanager", "status"], capture_output=True, text=True, env=env
    )
    assert both.returncode != 0
    assert "several appmanagers are running" in both.stderr
    assert str(first.instance_dir) in both.stderr and str(second.instance_dir) in both.stderr
    second.stop()
    empty = tmp_path / "empty"
    empty.mkdir()
    none = subprocess.run(
        [sys.executable, "-m", "appmanager", "status"],
        capture_output=True,
        text=True,
        env=dict(env, XDG_RUNTIME_DIR=str(empty)),
    )
    assert none.returncode != 0 and "no running appmanager found" in none.stderr


def test_restart_replaces_every_process(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--min-instances", "2")
    before = {p["pid"] for p in status_json(server)["apps"][0]["processes"]}
    result = cli("restart", "--instance-dir", str(server.instance_dir))
    assert result.returncode == 0, result.stderr
    assert f"restarted {APPS / 'wsgi_echo'}" in result.stdout
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = {p["pid"] for p in status_json(server)["apps"][0]["processes"]}
        if len(after) == 2 and not after & before:
            break
        time.sleep(0.1)
    assert len(after) == 2 and not after & before
    assert get(server.port, "/app/pid").status == 200


def test_restart_of_one_app_and_of_an_unknown_one(server_factory, tmp_path: Path) -> None:
    conf = tmp_path / "appmanager.toml"
    conf.write_text(
        f'[[app]]\nroot = "{APPS / "wsgi_echo"}"\nserver_names = ["a"]\n'
        f'[[app]]\nroot = "{APPS / "generic_app"}"\nserver_names = ["b"]\n'
        'app_start_command = "python3 server.py"\n'
    )
    server = server_factory(None, "--config", str(conf))
    ok = cli("restart", str(APPS / "generic_app"), "--instance-dir", str(server.instance_dir))
    assert ok.returncode == 0 and "generic_app" in ok.stdout and "wsgi_echo" not in ok.stdout
    bad = cli("restart", "/no/such/app", "--instance-dir", str(server.instance_dir))
    assert bad.returncode != 0 and "no app with root /no/such/app" in bad.stderr


def test_restart_with_a_broken_new_version_keeps_the_old_one(server_factory, tmp_path) -> None:
    import shutil

    app = tmp_path / "app"
    shutil.copytree(APPS / "wsgi_echo", app)
    server = server_factory(app)
    old = get(server.port, "/app/pid").body
    (app / "passenger_wsgi.py").write_text("raise RuntimeError('new version is broken')\n")
    result = cli("restart", "--instance-dir", str(server.instance_dir))
    assert result.returncode != 0
    assert "new version is broken" in result.stderr
    assert get(server.port, "/app/pid").body == old
    status = status_json(server)
    assert status["apps"][0]["boot_error"]["step"] == "LOAD_APP"


def test_stop_waits_for_the_core_to_exit(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    result = cli("stop", "--instance-dir", str(server.instance_dir))
    assert result.returncode == 0, result.stderr
    assert f"stopped appmanager (pid {server.proc.pid})" in result.stdout
    assert server.proc.wait(5) == 0
    assert not server.instance_dir.exists()


def test_detach_retires_one_process(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--min-instances", "2")
    victim = sorted(server.app_pids)[0]
    result = cli("detach", str(victim), "--instance-dir", str(server.instance_dir))
    assert result.returncode == 0, result.stderr
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"
    assert f"process {victim} retired: detached by the operator" in server.log()
    unknown = cli("detach", "999999", "--instance-dir", str(server.instance_dir))
    assert unknown.returncode != 0 and "no app process has pid 999999" in unknown.stderr


def test_top_shows_processes_and_events(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appmanager",
            "top",
            "--instance-dir",
            str(server.instance_dir),
            "--interval",
            "0.5",
            "--iterations",
            "6",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    victim = next(iter(server.app_pids))
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "PID" in out and "READY" in out
    assert f"exited: app=wsgi_echo, pid={victim}, status=-9" in out
    assert "spawned: app=wsgi_echo" in out


def test_a_hung_core_gives_a_clear_error_within_5_seconds(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        result = cli("status", "--instance-dir", str(server.instance_dir), timeout=20)
        elapsed = time.monotonic() - start
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert result.returncode != 0
    assert "did not answer within 5 s" in result.stderr
    assert elapsed <= 7  # 5 s of waiting plus the interpreter's start


def test_status_of_a_dead_instance_dir(tmp_path: Path) -> None:
    result = cli("status", "--instance-dir", str(tmp_path))
    assert result.returncode != 0 and f"no running appmanager in {tmp_path}" in result.stderr


def test_control_socket_is_owner_only(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    for name in ("control.sock", "events.sock"):
        mode = (server.instance_dir / name).stat().st_mode & 0o777
        assert mode & 0o077 == 0, oct(mode)
    assert server.instance_dir.stat().st_mode & 0o777 == 0o700


def test_sigusr1_reopens_the_log_file(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    rotated = server.log_path.with_suffix(".log.1")
    server.log_path.rename(rotated)
    os.kill(server.proc.pid, signal.SIGUSR1)
    get(server.port, "/app/print")
    server.wait_for_log("log files reopened (SIGUSR1)")
    assert "hello from the app's stdout" in server.wait_for_log("hello from the app's stdout")
    assert "received SIGTERM" not in rotated.read_text()
