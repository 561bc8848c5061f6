"""Process lifecycle rules with real processes: max_requests, idle reaping, memory limit, request
time limit, start timeout, per-app limit, eviction, bursts, and no process escaping the core."""

from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from conftest import APPS, get


def pids_of(server) -> set[int]:
    return {p.pid for p in server.app_processes()}


def test_max_requests_retires_processes_staggered(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--max-requests", "20", "--max-pool-size", "1")
    seen = []
    for _ in range(70):
        resp = get(server.port, "/app/pid")
        assert resp.status == 200
        seen.append(int(resp.body))
    log = server.log()
    retired = re.findall(r"process (\d+) retired: served (\d+) requests \(max_requests\)", log)
    assert len(retired) >= 2
    for _, count in retired:
        assert 20 <= int(count) <= 22  # the limit, plus up to 10% stagger
    # Every process served a run of requests, then its successor took over.
    assert len(set(seen)) == len(retired) + 1


def test_idle_processes_are_stopped_down_to_min_instances(server_factory) -> None:
    server = server_factory(
        APPS / "wsgi_echo", "--min-instances", "1", "--max-pool-size", "3", "--pool-idle-time", "1"
    )
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda _: get(server.port, "/app/sleep?0.5"), range(3)))
    assert server.log().count("entered READY") >= 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(pids_of(server)) > 1:
        time.sleep(0.2)
    assert len(pids_of(server)) == 1
    assert re.search(r"retired: idle for \d+ s \(pool_idle_time\)", server.log())


def test_memory_limit_retires_after_the_request(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--memory-limit", "60", "--max-pool-size", "2")
    first = int(get(server.port, "/app/grow?100").body)
    server.wait_for_log(f"process {first} retired: private memory", timeout=15)
    assert re.search(
        r"private memory \d+ MB is over the limit of 60 MB \(memory_limit\)", server.log()
    )
    server.wait_for_log(f"process {first} exited")
    resp = get(server.port, "/app/pid")
    assert resp.status == 200 and int(resp.body) != first


def test_max_request_time_kills_and_answers_504(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--max-request-time", "1")
    old = int(get(server.port, "/app/pid").body)
    start = time.monotonic()
    resp = get(server.port, "/app/sleep?30", timeout=15)
    assert resp.status == 504
    assert time.monotonic() - start < 5
    log = server.wait_for_log(f"process {old} exited with signal 9")
    assert f"process {old} killed: a request took longer than 1 s (max_request_time)" in log
    new = get(server.port, "/app/pid")
    assert new.status == 200 and int(new.body) != old


def test_start_timeout_kills_a_hanging_spawn(server_factory, tmp_path: Path) -> None:
    app = tmp_path / "hangs"
    app.mkdir()
    (app / "passenger_wsgi.py").write_text("import time\ntime.sleep(60)\napplication = None\n")
    server = server_factory(app, "--start-timeout", "1")
    assert "did not finish booting within 1 s (start_timeout)" in server.banner
    assert get(server.port).status == 500
    deadline = time.monotonic() + 5
    while pids_of(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pids_of(server), "the hanging process must be killed"


def test_max_instances_per_app(server_factory) -> None:
    server = server_factory(
        APPS / "wsgi_echo", "--max-instances-per-app", "2", "--max-pool-size", "6"
    )
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: get(server.port, "/app/sleep?0.5"), range(6)))
    assert all(r.status == 200 for r in responses)
    assert len({r.body for r in responses}) <= 2
    assert server.log().count("entered READY") <= 2


def test_burst_spawns_several_processes_at_once(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--min-instances", "1", "--max-pool-size", "8")
    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: get(server.port, "/app/sleep?1"), range(8)))
    elapsed = time.monotonic() - start
    assert all(r.status == 200 for r in responses)
    assert len({r.body for r in responses}) >= 4
    # One spawn at a time would need about 8 s; several at once get it done in a few.
    assert elapsed < 6, elapsed


def test_full_pool_evicts_an_idle_process_of_another_app(server_factory, tmp_path: Path) -> None:
    conf = tmp_path / "appmanager.toml"
    conf.write_text(
        f"""
max_pool_size = 1

[[app]]
root = "{APPS / "wsgi_echo"}"
server_names = ["a.test"]

[[app]]
root = "{APPS / "flask_app"}"
startup_file = "app.py"
server_names = ["b.test"]
min_instances = 0
"""
    )
    server = server_factory(None, "--config", str(conf))
    from conftest import request

    def host(name: str, path: str = "/") -> object:
        raw = f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()
        return request(server.port, raw, timeout=30)

    assert host("a.test").status == 200
    resp = host("b.test")
    assert resp.status == 200 and resp.body == b"Hello from Flask\n"  # type: ignore[attr-defined]
    assert "retired: making room for app flask_app (max_pool_size)" in server.log()


def test_no_process_escapes_a_killed_core(server_factory, tmp_path: Path) -> None:
    conf = tmp_path / "appmanager.toml"
    conf.write_text(
        f"""
[[app]]
root = "{APPS / "wsgi_echo"}"
server_names = ["py.test"]
min_instances = 2

[[app]]
root = "{APPS / "echo_rack"}"
server_names = ["rb.test"]

[[app]]
root = "{APPS / "echo_node"}"
server_names = ["js.test"]

[[app]]
root = "{APPS / "generic_app"}"
server_names = ["any.test"]
app_start_command = "python3 server.py"
"""
    )
    server = server_factory(None, "--config", str(conf))
    procs = server.app_processes()
    assert len(procs) >= 5
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    deadline = time.monotonic() + 2.0
    alive = procs
    while time.monotonic() < deadline:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(0.05)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    assert os.path.exists(server.instance_dir)  # a killed core cannot clean up; no process lives


def test_preloader_stops_when_idle_and_comes_back(server_factory) -> None:
    server = server_factory(
        APPS / "wsgi_echo",
        "--max-preloader-idle-time",
        "1",
        "--max-pool-size",
        "3",
        "--pool-idle-time",
        "0",
    )
    (first,) = server.preloader_pids()
    log = server.wait_for_log(f"preloader {first} of app wsgi_echo stopping: idle for", timeout=10)
    assert "(max_preloader_idle_time)" in log
    server.wait_for_log(f"preloader {first} exited with status 0")
    # The process it forked keeps serving without it.
    assert get(server.port, "/app/pid").status == 200
    # A burst needs more processes: a new preloader loads the app and forks them.
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda _: get(server.port, "/app/sleep?0.5"), range(3)))
    assert all(r.status == 200 for r in responses)
    assert len(server.preloader_pids()) == 2


def test_direct_spawning_has_no_preloader(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--spawn-method", "direct")
    assert server.preloader_pids() == set()
    assert "forked by preloader" not in server.log()
    assert get(server.port, "/app/pid").status == 200


def test_after_fork_hook_runs_in_each_process(server_factory, tmp_path: Path) -> None:
    app = tmp_path / "hooked"
    app.mkdir()
    marker = tmp_path / "forks"
    (app / "passenger_wsgi.py").write_text(
        "import os\n"
        f"MARKER = {str(marker)!r}\n"
        "def appmanager_after_fork():\n"
        "    with open(MARKER, 'a') as f:\n"
        "        f.write(str(os.getpid()) + '\\n')\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [str(os.getpid()).encode()]\n"
    )
    server = server_factory(app, "--min-instances", "2")
    hooked = {int(line) for line in marker.read_text().split()}
    assert hooked == {p.pid for p in server.app_processes()}
