"""Failures: a crash mid-request gets 502 and a fresh process; an app that cannot boot gets an error
page, a log line and a back-off."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import psutil
from conftest import APPS, get


def test_crash_mid_request_is_502_and_the_process_is_replaced(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    old = get(server.port, "/app/pid").body
    start = time.monotonic()
    resp = get(server.port, "/app/crash", timeout=10)
    assert resp.status == 502
    assert time.monotonic() - start < 2, "a crash must be answered at once, not after a timeout"
    log = server.wait_for_log("exited with status 7")
    assert f"process {int(old)} of app wsgi_echo died unexpectedly" in log
    new = get(server.port, "/app/pid").body
    assert new != old
    assert not psutil.pid_exists(int(old)) or psutil.Process(int(old)).status() == "zombie"


def test_crash_with_other_requests_waiting(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--max-pool-size", "1")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        crash = pool.submit(get, server.port, "/app/crash")
        time.sleep(0.05)
        waiting = [pool.submit(get, server.port, "/app/pid") for _ in range(3)]
        assert crash.result().status == 502
        assert all(f.result().status == 200 for f in waiting)


def test_boot_error_gives_a_plain_500_in_production(server_factory) -> None:
    server = server_factory(APPS / "boot_error")
    assert "failed to start: LOAD_APP failed" in server.banner
    resp = get(server.port)
    assert resp.status == 500
    assert b"could not be started" in resp.body
    assert b"Traceback" not in resp.body
    assert b"broken on purpose" not in resp.body
    log = server.log()
    assert "app boot_error failed to start: LOAD_APP failed" in log
    assert "this app is broken on purpose" in log
    assert "about to fail at import" in log  # the app's own output, captured


def test_boot_error_page_shows_details_in_development(server_factory) -> None:
    server = server_factory(APPS / "boot_error", "-e", "development")
    resp = get(server.port)
    assert resp.status == 500
    assert b"LOAD_APP" in resp.body
    assert b"Traceback" in resp.body
    assert b"this app is broken on purpose" in resp.body
    assert b"about to fail at import" in resp.body


def test_repeated_boot_failures_back_off(server_factory) -> None:
    server = server_factory(APPS / "boot_error")
    time.sleep(3.5)
    for _ in range(20):
        get(server.port)
    log = server.log()
    attempts = re.findall(r"attempt (\d+); next attempt in (\d+) s", log)
    # Within 3.5 s: attempts at 0, 1 and 3 s; twenty requests in between start nothing new.
    assert [int(a) for a, _ in attempts] == list(range(1, len(attempts) + 1))
    assert 2 <= len(attempts) <= 4
    assert [int(d) for _, d in attempts][:3] == [1, 2, 4][: len(attempts)]


def test_fixed_app_recovers_after_backoff(server_factory, tmp_path: Path) -> None:
    app = tmp_path / "flaky"
    shutil.copytree(APPS / "boot_error", app)
    server = server_factory(app)
    assert get(server.port).status == 500
    (app / "passenger_wsgi.py").write_text(
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [b'fixed']\n"
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        resp = get(server.port)
        if resp.status == 200:
            break
        time.sleep(0.3)
    assert resp.body == b"fixed"


def test_app_exception_is_500_and_logged_with_the_traceback(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    resp = get(server.port, "/app/raise")
    assert resp.status == 500
    assert b"echo app raised on purpose" not in resp.body
    server.wait_for_log("RuntimeError: echo app raised on purpose")
    assert get(server.port, "/app/pid").status == 200


def test_app_exception_shows_traceback_in_development(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "-e", "development")
    resp = get(server.port, "/app/raise")
    assert resp.status == 500
    assert b"echo app raised on purpose" in resp.body


def test_app_output_is_captured_with_app_and_pid(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo")
    pid = int(get(server.port, "/app/pid").body)
    get(server.port, "/app/print")
    log = server.wait_for_log("wsgi.errors line")
    assert f"[app wsgi_echo pid {pid}] hello from the app's stdout" in log
    assert f"[app wsgi_echo pid {pid}] and its stderr" in log


def test_killed_app_process_is_replaced_to_min_instances(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--min-instances", "2")
    victim = sorted(server.app_pids)[0]
    psutil.Process(victim).kill()
    server.wait_for_log(f"process {victim} exited with signal 9")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.log().count("entered READY") >= 3:
            break
        time.sleep(0.05)
    assert server.log().count("entered READY") == 3


def test_friendly_error_pages_in_production(server_factory) -> None:
    server = server_factory(APPS / "boot_error", "--friendly-error-pages")
    body = get(server.port).body
    assert b"LOAD_APP" in body and b"this app is broken on purpose" in body


def test_friendly_error_pages_off_in_development(server_factory) -> None:
    server = server_factory(
        APPS / "boot_error", "-e", "development", "--friendly-error-pages", "off"
    )
    body = get(server.port).body
    assert b"could not be started" in body and b"broken on purpose" not in body


def test_custom_error_page(server_factory, tmp_path: Path) -> None:
    page = tmp_path / "sorry.html"
    page.write_text("<html><body>We are sorry: maintenance.</body></html>")
    server = server_factory(APPS / "boot_error", "--custom-error-page", str(page))
    resp = get(server.port)
    assert resp.status == 500
    assert resp.body == page.read_bytes()


def test_missing_custom_error_page_is_rejected_at_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "appmanager",
            "start",
            str(APPS / "boot_error"),
            "--custom-error-page",
            str(tmp_path / "nope.html"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "--custom-error-page: file" in result.stderr and "does not exist" in result.stderr


def test_core_error_pages_are_small_plain_http(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--max-request-time", "1")
    for path, status in (("/app/crash", 502), ("/app/sleep?20", 504)):
        resp = get(server.port, path, timeout=20)
        assert resp.status == status
        assert resp.header("Content-Type") == "text/plain; charset=utf-8"
        assert int(resp.header("Content-Length") or -1) == len(resp.body) < 200
