"""Smart spawning in the Python shim (docs/protocol/spawn.md, "Smart spawning"), driven for real.

The test plays the core (python_shim.py): it starts the shim with ``"spawn_method": "smart"``, gets
PRELOADER, then sends FORK with a new control channel and progress file for each app process
(``Shim.fork``) and speaks to every forked process over its own channel, as it would to a process
spawned directly. The test runner is a child subreaper (tests/conftest.py, and again here for the
watchdog tests), so forked processes whose preloader is gone become its children, and the tests
reap them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from python_shim import TIMEOUT, Shim, http_head, spawner, start_shim

APPS = Path(__file__).resolve().parents[1] / "apps"
PR_SET_CHILD_SUBREAPER = 36
# The watchdog checks every 0.5 s; spawn.md promises at least every second.
WATCHDOG_LIMIT = 1.5

# Notes in ./imports each time it is imported; answers with what a forked process should show.
HOOKS_APP = """
    import json
    import os
    import signal
    import threading
    from pathlib import Path

    with open(Path(__file__).with_name("imports"), "a") as f:
        f.write(f"{os.getpid()}\\n")

    HOOKS = []
    os.register_at_fork(after_in_child=lambda: HOOKS.append(["register_at_fork", os.getpid()]))

    if Path(__file__).with_name("fail_after_fork").exists():

        def appmanager_after_fork():
            raise RuntimeError("after-fork-hook-failed")

    else:

        def appmanager_after_fork():
            HOOKS.append(["appmanager_after_fork", os.getpid()])


    def application(environ, start_response):
        body = environ["wsgi.input"].read()
        data = {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "pgid": os.getpgid(0),
            "hooks": HOOKS,
            "threads": sorted(t.name for t in threading.enumerate()),
            "sigchld_default": signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL,
            "path": environ["PATH_INFO"],
            "body": body.decode(),
        }
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(data).encode()]
"""

# An ASGI app whose lifespan leaves ./startup and ./shutdown with the pid it ran in, and fails
# its startup while ./fail_startup exists.
LIFESPAN_APP = """
    import json
    import os
    from pathlib import Path

    HERE = Path(__file__).parent


    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    if (HERE / "fail_startup").exists():
                        await send({"type": "lifespan.startup.failed", "message": "no db"})
                        return
                    (HERE / "startup").write_text(str(os.getpid()))
                    scope["state"]["opened_by"] = os.getpid()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    (HERE / "shutdown").write_text(str(os.getpid()))
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = json.dumps({"pid": os.getpid(), "opened_by": scope["state"]["opened_by"]})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body.encode()})
"""


def _become_subreaper() -> None:
    """Orphans of a dead preloader must come to the test (standing in for the core)."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    yield from spawner(tmp_path)


@pytest.fixture
def preload(spawn: Any) -> Any:
    """``preload(files, startup, **config)``: a shim started as a preloader that answered
    PRELOADER; the test process is its core unless ``core_pid`` says otherwise."""

    def start(files: dict[str, str], startup: str, **config: Any) -> tuple[Shim, dict[str, Any]]:
        config = {"spawn_method": "smart", "core_pid": os.getpid(), **config}
        shim, tag, payload = spawn(files, startup, **config)
        assert tag == "PRELOADER", f"{tag} {payload}:\n{shim.log()}"
        return shim, payload

    return start


def fork_ready(preloader: Shim) -> tuple[Shim, dict[str, Any]]:
    """Forks a process and reads its READY."""
    child = preloader.fork()
    tag, ready = child.answer()
    assert tag == "READY", f"{tag} {ready}:\n{preloader.log()}"
    return child, ready


def get(shim: Shim, path: str = "/", body: bytes = b"") -> dict[str, Any]:
    """One request; the app's JSON answer."""
    head = http_head(path, ("Content-Length", str(len(body))), method="POST" if body else "GET")
    result = shim.request(head, body)
    assert result.done == f"D {shim.seq} k"
    assert result.response.status == 200
    data: dict[str, Any] = result.response.json()
    return data


def wait_until(condition: Any, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def proc_status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return value.strip()
    raise KeyError(field)


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for ``signum`` (SigCgt in /proc)."""
    return bool(int(proc_status(pid, "SigCgt"), 16) >> (signum - 1) & 1)


# The preloader


def test_the_preloader_answers_preloader(preload: Any) -> None:
    shim, payload = preload({"app.py": HOOKS_APP}, "app.py", app_type="python")
    assert payload == {"pid": shim.process.pid, "app_type": "wsgi", "protocol": 1}
    # Waiting for commands, with SIGCHLD handled for the reaping.
    assert catches(shim.process.pid, signal.SIGCHLD)


def test_an_asgi_preloader_says_asgi_and_runs_no_lifespan(preload: Any, tmp_path: Path) -> None:
    shim, payload = preload({"app.py": LIFESPAN_APP}, "app.py", app_type="python")
    assert payload["app_type"] == "asgi"
    assert not (tmp_path / "app0" / "startup").exists()


def test_a_load_error_fails_load_app(spawn: Any) -> None:
    shim, tag, payload = spawn(
        {"app.py": "import not_a_module_anywhere\n"},
        "app.py",
        spawn_method="smart",
        core_pid=os.getpid(),
    )
    assert (tag, payload["step"]) == ("ERROR", "LOAD_APP")
    assert "not_a_module_anywhere" in payload["message"]
    assert shim.process.wait(TIMEOUT) == 1


def test_direct_spawning_is_unchanged(spawn: Any) -> None:
    shim, tag, payload = spawn({"app.py": HOOKS_APP}, "app.py", spawn_method="direct")
    assert (tag, payload["pid"]) == ("READY", shim.process.pid)
    data = get(shim)
    assert data["pid"] == shim.process.pid
    assert data["hooks"] == []


def test_an_unknown_spawn_method_fails_prepare(spawn: Any) -> None:
    shim, tag, payload = spawn({"app.py": HOOKS_APP}, "app.py", spawn_method="clever")
    assert (tag, payload["step"]) == ("ERROR", "PREPARE")
    assert "clever" in payload["message"]
    assert shim.process.wait(TIMEOUT) == 1


# Forking


def test_a_forked_process_answers_ready_and_serves(preload: Any) -> None:
    shim, _ = preload({"app.py": HOOKS_APP}, "app.py")
    child, ready = fork_ready(shim)
    pid = child.process.pid
    assert pid != shim.process.pid
    assert ready == {"pid": pid, "concurrency": 1, "protocol": 1, "app_type": "wsgi"}
    data = get(child, "/echo", b"hello")
    assert (data["pid"], data["ppid"], data["path"], data["body"]) == (
        pid,
        shim.process.pid,
        "/echo",
        "hello",
    )
    # The progress file that came with FORK is the one it writes.
    assert child.progress() == child.seq == 1


def test_two_forks_two_processes_one_import(preload: Any, tmp_path: Path) -> None:
    shim, _ = preload({"app.py": HOOKS_APP}, "app.py")
    first, _ = fork_ready(shim)
    second, _ = fork_ready(shim)
    assert len({shim.process.pid, first.process.pid, second.process.pid}) == 3
    assert get(first)["pid"] == first.process.pid
    assert get(second)["pid"] == second.process.pid
    assert get(first)["pid"] == first.process.pid
    imports = (tmp_path / "app0" / "imports").read_text().split()
    assert imports == [str(shim.process.pid)]


def test_after_fork_hooks_run_in_each_forked_process(preload: Any) -> None:
    shim, _ = preload({"app.py": HOOKS_APP}, "app.py")
    for _ in range(2):
        child, _ = fork_ready(shim)
        pid = child.process.pid
        # The preloader ran neither hook: each process sees its own two, in this order.
        assert get(child)["hooks"] == [
            ["register_at_fork", pid],
            ["appmanager_after_fork", pid],
        ]


def test_a_failing_after_fork_hook_fails_listen(preload: Any, tmp_path: Path) -> None:
    shim, _ = preload({"app.py": HOOKS_APP, "fail_after_fork": ""}, "app.py")
    child = shim.fork()
    tag, payload = child.answer()
    assert (tag, payload["step"]) == ("ERROR", "LISTEN")
    assert payload["message"] == "RuntimeError: after-fork-hook-failed"
    assert "appmanager_after_fork" in payload["traceback"]
    assert shim.wait_exited(child.process.pid) == 1


def test_a_forked_process_drops_what_was_the_preloaders(preload: Any, tmp_path: Path) -> None:
    shim, _ = preload({"app.py": HOOKS_APP}, "app.py")
    child, _ = fork_ready(shim)
    pid = child.process.pid
    data = get(child)
    # Its own process group, as a process spawned directly leads one: the core signals groups.
    assert data["pgid"] == pid
    # No SIGCHLD handler, and a watchdog instead of the parent-death signal.
    assert data["sigchld_default"]
    assert not catches(pid, signal.SIGCHLD)
    assert data["threads"] == ["MainThread", "appmanager-parent-watchdog"]
    # Its own channel and progress file at 3 and 4, close-on-exec; nothing of the preloader's.
    fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert fds[4] == str(tmp_path / "app0" / "progress-1")
    assert fds[3].startswith("socket:")
    assert str(tmp_path / "app0" / "progress") not in fds.values()
    assert not [target for target in fds.values() if target.startswith("pipe:")]
    for fd in (3, 4):
        flags = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0]
        assert int(flags, 8) & 0o2000000, f"fd {fd} is not close-on-exec"


def test_a_malformed_fork_is_ignored_and_the_next_one_works(preload: Any) -> None:
    shim, _ = preload({"app.py": HOOKS_APP}, "app.py")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        socket.send_fds(shim.control, [b'FORK {"seq": 7}'], [b.fileno()])
    shim.control.send(b"HELLO")
    child, _ = fork_ready(shim)
    assert get(child)["pid"] == child.process.pid
    assert "ignoring FORK 7: ProtocolError" in shim.log()
    assert "ignoring a FORK command" in shim.log()


def test_threads_the_app_started_while_loading_are_warned_about(preload: Any) -> None:
    app = """
        import threading
        import time

        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()


        def application(environ, start_response):
            start_response("200 OK", [])
            return [str(threading.active_count()).encode()]
    """
    shim, _ = preload({"app.py": app}, "app.py")
    child, _ = fork_ready(shim)
    # The thread did not come along; the watchdog is the one besides the main thread.
    assert child.request(http_head()).response.body == b"2"
    assert "the app started 1 thread(s) while it loaded" in shim.log()


# Exits


def test_a_killed_process_is_reported_exited_minus_9(preload: Any) -> None:
    shim, _ = preload({"app.py": HOOKS_APP}, "app.py")
    child, _ = fork_ready(shim)
    os.kill(child.process.pid, signal.SIGKILL)
    assert shim.wait_exited(child.process.pid) == -9


def test_a_process_told_to_stop_is_reported_exited_0(preload: Any) -> None:
    shim, _ = preload({"app.py": HOOKS_APP}, "app.py")
    child, _ = fork_ready(shim)
    child.control.close()
    assert shim.wait_exited(child.process.pid) == 0


@pytest.mark.parametrize("core_pid", ["given", "absent"])
def test_eof_stops_the_preloader_and_its_processes_keep_serving(
    preload: Any, core_pid: str
) -> None:
    # Without core_pid the core is the preloader's parent, which the test is here too.
    config = {"core_pid": os.getpid() if core_pid == "given" else None}
    shim, _ = preload({"app.py": HOOKS_APP}, "app.py", **config)
    child, _ = fork_ready(shim)
    shim.control.close()
    assert shim.process.wait(TIMEOUT) == 0
    # Re-parented to the test, its subreaper and core: the watchdog lets it be.
    wait_until(lambda: int(proc_status(child.process.pid, "PPid")) == os.getpid())
    time.sleep(WATCHDOG_LIMIT)
    data = get(child)
    assert (data["pid"], data["ppid"]) == (child.process.pid, os.getpid())
    child.control.close()
    assert child.process.wait(TIMEOUT) == 0


def test_sigterm_stops_the_preloader_and_not_its_processes(preload: Any) -> None:
    shim, _ = preload({"app.py": HOOKS_APP}, "app.py")
    child, _ = fork_ready(shim)
    os.kill(shim.process.pid, signal.SIGTERM)
    assert shim.process.wait(TIMEOUT) == 0
    assert get(child)["pid"] == child.process.pid


# The watchdog: a forked process dies with the core, not with the preloader


def test_a_process_outlives_its_preloader_while_the_core_lives(preload: Any) -> None:
    _become_subreaper()
    shim, _ = preload({"app.py": HOOKS_APP}, "app.py", core_pid=os.getpid())
    child, _ = fork_ready(shim)
    shim.process.kill()
    assert shim.process.wait(TIMEOUT) == -signal.SIGKILL
    time.sleep(WATCHDOG_LIMIT)
    assert child.process.alive()
    assert get(child)["ppid"] == os.getpid()


def test_a_process_exits_when_its_parent_is_neither_preloader_nor_core(preload: Any) -> None:
    _become_subreaper()
    # The core is some other process: once the preloader dies, the test is the parent.
    with subprocess.Popen(["sleep", "60"]) as core:
        try:
            shim, _ = preload({"app.py": HOOKS_APP}, "app.py", core_pid=core.pid)
            child, _ = fork_ready(shim)
            assert get(child)["pid"] == child.process.pid
            shim.process.kill()
            assert shim.process.wait(TIMEOUT) == -signal.SIGKILL
            started = time.monotonic()
            assert child.process.wait(TIMEOUT) == 1
            assert time.monotonic() - started < WATCHDOG_LIMIT
            assert "the core is gone; exiting" in shim.log()
        finally:
            core.kill()


# ASGI


def test_an_asgi_process_runs_the_lifespan_itself(preload: Any, tmp_path: Path) -> None:
    root = tmp_path / "app0"
    shim, _ = preload({"app.py": LIFESPAN_APP}, "app.py", app_type="asgi")
    child, ready = fork_ready(shim)
    pid = child.process.pid
    assert ready == {
        "pid": pid,
        "concurrency": 0,
        "protocol": 1,
        "app_type": "asgi",
        "connections": True,
    }
    assert (root / "startup").read_text() == str(pid)
    assert get(child) == {"pid": pid, "opened_by": pid}
    second, _ = fork_ready(shim)
    assert get(second) == {"pid": second.process.pid, "opened_by": second.process.pid}
    child.control.close()
    assert shim.wait_exited(pid) == 0
    assert (root / "shutdown").read_text() == str(pid)


def test_a_failed_lifespan_startup_fails_listen(preload: Any, tmp_path: Path) -> None:
    root = tmp_path / "app0"
    shim, _ = preload({"app.py": LIFESPAN_APP, "fail_startup": ""}, "app.py", app_type="asgi")
    child = shim.fork()
    tag, payload = child.answer()
    assert (tag, payload["step"]) == ("ERROR", "LISTEN")
    assert payload["message"] == "lifespan startup failed: no db"
    assert shim.wait_exited(child.process.pid) == 1
    # The preloader goes on: once the app can start, the next process does.
    (root / "fail_startup").unlink()
    second, _ = fork_ready(shim)
    assert get(second)["opened_by"] == second.process.pid


def test_the_asgi_echo_app_serves_from_a_forked_process(preload: Any) -> None:
    app = (APPS / "echo_asgi" / "app.py").read_text()
    shim, payload = preload({"app.py": app}, "app.py", app_type="python")
    assert payload["app_type"] == "asgi"
    child, _ = fork_ready(shim)
    # Requests at once, on the forked process's own event loop.
    connections = [child.connect() for _ in range(3)]
    for connection in connections:
        child.submit(connection, http_head("/app/sleep?0.2"))
    started = time.monotonic()
    assert len(child.wait_replies(3, connections)) == 3
    assert time.monotonic() - started < 0.5
    for connection in connections:
        assert connection.finish().endswith(str(child.process.pid).encode())
    result = child.request(http_head("/app/stream"))
    assert (result.response.body, result.response.chunked) == (b"line 0\nline 1\nline 2\n", True)


# Memory and fork time, Django


def private_bytes(pid: int) -> int:
    """The process's private memory (USS): its pages no other process shares."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1]) * 1024
    return total


# Django's WSGI app behind a full collection on every request: what a long-running process
# meets sooner or later, and what would write to every object the preloader loaded, were they not
# frozen out of the collector's reach before the fork.
COLLECTING_DJANGO = """
    import gc

    from mysite.wsgi import application as django_application


    def application(environ, start_response):
        gc.collect()
        return django_application(environ, start_response)
"""


@pytest.mark.parametrize("collecting", [False, True], ids=["plain", "full-gc-per-request"])
def test_a_forked_django_process_shares_most_of_its_memory(
    tmp_path: Path, collecting: bool
) -> None:
    pytest.importorskip("django")
    root = APPS / "django_project"
    startup = root / "mysite" / "wsgi.py"
    if collecting:
        startup = tmp_path / "collecting_wsgi.py"
        startup.write_text(textwrap.dedent(COLLECTING_DJANGO))
    config = {"app_root": str(root), "startup_file": str(startup), "app_type": "wsgi"}
    direct = start_shim(_mkdir(tmp_path / "direct"))
    preloader = start_shim(_mkdir(tmp_path / "smart"))
    try:
        assert direct.handshake(**config)[0] == "READY"
        assert preloader.handshake(**config, spawn_method="smart")[0] == "PRELOADER"
        fork_times = []
        children = []
        for _ in range(3):
            started = time.monotonic()
            child, _ = fork_ready(preloader)
            fork_times.append(time.monotonic() - started)
            children.append(child)
        for shim in (direct, *children):
            for _ in range(3):
                assert shim.request(http_head("/info/")).response.status == 200
        direct_private = private_bytes(direct.process.pid)
        forked_private = [private_bytes(child.process.pid) for child in children]
        ratio = max(forked_private) / direct_private
        print(
            f"\nDjango: direct {direct_private / 2**20:.1f} MiB private; forked "
            f"{', '.join(f'{b / 2**20:.1f}' for b in forked_private)} MiB ({ratio:.0%}); "
            f"FORK to READY {', '.join(f'{t * 1000:.1f}' for t in fork_times)} ms"
        )
        assert ratio < 0.4
        # The target is 100 ms; a loaded test machine gets some slack.
        assert min(fork_times) < 0.5
    finally:
        preloader.stop()
        direct.stop()


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path
