"""/metrics in the Prometheus text format and /healthz, from a real core."""

from __future__ import annotations

import re
import threading
import time

from conftest import APPS, free_port, get, request


def scrape(port: int, path: str) -> tuple[int, str]:
    resp = request(port, f"GET {path} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n".encode())
    return resp.status, resp.body.decode()


def value(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not in:\n{text}")


def test_metrics_and_healthz(server_factory) -> None:
    mport = free_port()
    server = server_factory(
        APPS / "wsgi_echo", "--metrics-address", f"127.0.0.1:{mport}", "--min-instances", "2"
    )
    for _ in range(5):
        assert get(server.port, "/app/pid").status == 200
    app = 'app="wsgi_echo"'
    # A process writes its response before it reports it done (D): the last report may reach
    # the core a moment after the client has its answer.
    deadline = time.monotonic() + 5
    while True:
        status, text = scrape(mport, "/metrics")
        assert status == 200
        if value(text, f"appmanager_requests_total{{{app}}}") == 5 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert value(text, f"appmanager_requests_total{{{app}}}") == 5
    assert value(text, f"appmanager_request_queue_length{{{app}}}") == 0
    assert value(text, f'appmanager_processes{{{app},state="READY"}}') == 2
    assert value(text, f"appmanager_spawn_failures_total{{{app}}}") == 0
    assert value(text, f'appmanager_request_duration_seconds_bucket{{{app},le="+Inf"}}') == 5
    assert value(text, f"appmanager_request_duration_seconds_count{{{app}}}") == 5
    for pid in server.app_pids:
        labels = f'{app},pid="{pid}"'
        assert value(text, f"appmanager_process_resident_memory_bytes{{{labels}}}") > 0
        assert value(text, f"appmanager_process_private_memory_bytes{{{labels}}}") > 0
        assert value(text, f"appmanager_process_cpu_seconds_total{{{labels}}}") >= 0
    # Every sample belongs to a declared family.
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in families or base in families, line
    status, body = scrape(mport, "/healthz")
    assert (status, body) == (200, "ready\n")
    assert scrape(mport, "/other")[0] == 404


def test_healthz_turns_unready_while_stopping(server_factory) -> None:
    mport = free_port()
    server = server_factory(APPS / "wsgi_echo", "--metrics-address", f"127.0.0.1:{mport}")
    slow = threading.Thread(target=get, args=(server.port, "/app/sleep?2"))
    slow.start()
    time.sleep(0.3)
    server.proc.send_signal(15)
    time.sleep(0.5)
    status, body = scrape(mport, "/healthz")
    slow.join()
    assert (status, body) == (503, "not ready\n")
    server.proc.wait(20)


def test_spawn_failures_are_counted(server_factory) -> None:
    mport = free_port()
    broken = server_factory(APPS / "boot_error", "--metrics-address", f"127.0.0.1:{mport}")
    _, text = scrape(mport, "/metrics")
    assert value(text, 'appmanager_spawn_failures_total{app="boot_error"}') >= 1
    broken.stop()


def test_bad_metrics_address_is_rejected() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "appmanager",
            "start",
            str(APPS / "wsgi_echo"),
            "--metrics-address",
            "nonsense",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "--metrics-address: must be HOST:PORT" in result.stderr
