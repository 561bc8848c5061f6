"""Smart spawning in the Ruby shim (docs/protocol/spawn.md, "Smart spawning"), driven for real.

The test plays the core, as test_ruby_shim_protocol.py does: it starts the shim with
``"spawn_method": "smart"``, gets ``PRELOADER``, then sends ``FORK`` with a new control channel and
progress file for each app process, and speaks to every forked process over its own channel. The
test runner is a child subreaper (tests/conftest.py, and again here for the watchdog tests), so
forked processes whose preloader is gone become its children, and the tests reap them.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from python_shim import Connection, HTTPResponse, http_head, parse_response
from test_ruby_shim_protocol import APPS, RUBY, TIMEOUT, Shim, need, start_shim

pytestmark = pytest.mark.skipif(RUBY is None, reason="no ruby interpreter on PATH")

PR_SET_CHILD_SUBREAPER = 36
# The watchdog checks every 0.5 s; spawn.md promises at least every second.
WATCHDOG_LIMIT = 1.5

# Records, in ./marker, every evaluation of config.ru and every hook that runs, with the pid.
HOOKS_APP = """
    def note(line)
      File.write(File.expand_path("marker"), "#{line} #{Process.pid}\\n", mode: "a")
    end

    note("loaded")
    AppManager.after_fork { note("after_fork") } if defined?(AppManager)
    if defined?(PhusionPassenger)
      PhusionPassenger.on_event(:starting_worker_process) { |forked| note("starting #{forked}") }
      PhusionPassenger.on_event(:stopping_worker_process) { note("stopping") }
    end
    run ->(env) { [200, { "content-type" => "text/plain" }, [Process.pid.to_s]] }
"""


@dataclass
class Forked:
    """A process the preloader forked, and the core's end of its own control channel."""

    pid: int
    control: socket.socket
    progress_path: Path
    listener: socket.socket
    # The inode of the channel's end that the process holds, as /proc names it: socket:[inode].
    channel_inode: int
    seq: int = 0

    def receive(self) -> tuple[str, dict[str, Any]]:
        tag, _, payload = self.control.recv(1 << 20).partition(b" ")
        return tag.decode(), json.loads(payload)

    def request(self, head: bytes) -> tuple[str, HTTPResponse]:
        """One small request on a fresh connection; returns the D reply and the response."""
        connection = Connection(self.listener)
        try:
            self.seq += 1
            line = f"Q {self.seq} K 192.0.2.7 54321 127.0.0.1 8000 http {len(head)} 0\n"
            socket.send_fds(self.control, [line.encode() + head], [connection.server.fileno()])
            done = self.control.recv(1 << 16).decode()
            response, rest = parse_response(connection.finish())
        finally:
            connection.close()
        assert rest == b""
        return done, response

    def get(self, target: str = "/") -> bytes:
        done, response = self.request(http_head(target))
        assert (done, response.status) == (f"D {self.seq} k 200 {len(response.body)}", 200), (
            response.body
        )
        return response.body


@dataclass
class Preloader:
    """A shim started as a preloader, and the processes it forked."""

    shim: Shim
    directory: Path
    forked: list[Forked] = field(default_factory=list)
    fork_seq: int = 0

    @property
    def pid(self) -> int:
        return self.shim.process.pid

    def receive(self) -> tuple[str, dict[str, Any]]:
        tag, _, payload = self.shim.control.recv(1 << 20).partition(b" ")
        return tag.decode(), json.loads(payload)

    def send_fork(self) -> Forked:
        """Sends FORK with a new channel and progress file; returns the process once FORKED."""
        self.fork_seq += 1
        seq = self.fork_seq
        core_end, process_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        core_end.settimeout(TIMEOUT)
        channel_inode = os.fstat(process_end.fileno()).st_ino
        progress_path = self.directory / f"progress-{seq}"
        progress_path.write_bytes(bytes(8))
        progress_fd = os.open(progress_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            message = f"FORK {json.dumps({'seq': seq})}".encode()
            socket.send_fds(self.shim.control, [message], [process_end.fileno(), progress_fd])
        finally:
            # As the core does: only the forked process may hold its end, or EOF never comes.
            process_end.close()
            os.close(progress_fd)
        tag, payload = self.receive()
        assert (tag, payload["seq"]) == ("FORKED", seq), f"{tag} {payload}\n{self.shim.log()}"
        forked = Forked(payload["pid"], core_end, progress_path, self.shim.listener, channel_inode)
        self.forked.append(forked)
        return forked

    def fork(self) -> Forked:
        """FORK, FORKED, then READY from the new process on its own channel."""
        forked = self.send_fork()
        tag, payload = forked.receive()
        assert tag == "READY", f"{payload}\n{self.shim.log()}"
        assert payload == {
            "pid": forked.pid,
            "concurrency": 1,
            "connections": True,
            "protocol": 1,
        }
        return forked

    def stop(self) -> None:
        """Stops every forked process, then the preloader, and reaps them all."""
        for forked in self.forked:
            forked.control.close()
        self.shim.stop()
        for forked in self.forked:
            reap(forked.pid)


def reap(pid: int, timeout: float = TIMEOUT) -> int | None:
    """Waits for a process to be gone; returns its exit code when it was this runner's child to
    reap (a forked process whose preloader died), None when someone else reaped it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
            if reaped == pid:
                return os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            if not psutil.pid_exists(pid):
                return None
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"process {pid} still there after {timeout} s; killed")
        time.sleep(0.02)


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())


def start_preloader(app_root: Path, log_dir: Path, **config: Any) -> Preloader:
    """Starts the shim on app_root in smart mode and requires a PRELOADER answer."""
    preloader = Preloader(start_shim(app_root, log_dir), log_dir)
    try:
        config = {
            "app_root": str(app_root),
            "startup_file": str(app_root / "config.ru"),
            "spawn_method": "smart",
            "core_pid": os.getpid(),
            **config,
        }
        tag, payload = preloader.shim.handshake(**config)
        assert tag == "PRELOADER", f"{payload}\n{preloader.shim.log()}"
        assert payload == {"pid": preloader.pid, "app_type": "rack", "protocol": 1}
    except BaseException:
        preloader.stop()
        raise
    return preloader


@pytest.fixture
def preload(tmp_path: Path) -> Iterator[Callable[..., Preloader]]:
    """Starts preloaders on app files written under tmp_path, or on an app directory; stops and
    reaps every process afterwards."""
    preloaders: list[Preloader] = []

    def preload(app: dict[str, str] | Path, **config: Any) -> Preloader:
        log_dir = tmp_path / f"preloader{len(preloaders)}"
        log_dir.mkdir()
        if isinstance(app, Path):
            root = app
        else:
            root = log_dir
            for name, text in app.items():
                (root / name).write_text(textwrap.dedent(text))
        preloader = start_preloader(root, log_dir, **config)
        preloaders.append(preloader)
        return preloader

    try:
        yield preload
    finally:
        for preloader in preloaders:
            preloader.stop()


def fd_links(pid: int) -> dict[int, str]:
    """What each of a process's descriptors refers to, as /proc names it."""
    return {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


def marker_lines(preloader: Preloader) -> list[str]:
    return (preloader.directory / "marker").read_text().splitlines()


# The preloader


def test_a_forked_process_answers_ready_on_its_own_channel_and_serves(
    preload: Callable[..., Preloader],
) -> None:
    preloader = preload(APPS / "echo_rack")
    forked = preloader.fork()
    assert forked.pid != preloader.pid
    assert psutil.Process(forked.pid).ppid() == preloader.pid
    assert forked.get("/app/pid") == str(forked.pid).encode()
    # Progress goes to the forked process's own file, not the preloader's.
    assert forked.progress_path.read_bytes() == (1).to_bytes(8, "little")
    assert preloader.shim.progress() == 0


def test_the_received_descriptors_sit_at_3_and_4_close_on_exec(
    preload: Callable[..., Preloader],
) -> None:
    preloader = preload(APPS / "echo_rack")
    forked = preloader.fork()
    fds = fd_links(forked.pid)
    assert fds[3] == f"socket:[{forked.channel_inode}]"
    assert fds[4] == str(forked.progress_path)
    # The preloader's channel and progress file are gone, and so is its wake-up pipe.
    assert [link for link in fds.values() if link.startswith(("socket:", "pipe:"))] == [fds[3]]
    assert str(preloader.shim.progress_path) not in fds.values()
    assert forked.get("/app/inheritable-fds") == b"[]"


def test_two_forks_make_two_processes_and_config_ru_is_evaluated_once(
    preload: Callable[..., Preloader],
) -> None:
    preloader = preload({"config.ru": HOOKS_APP})
    first, second = preloader.fork(), preloader.fork()
    assert len({preloader.pid, first.pid, second.pid}) == 3
    assert first.get() == str(first.pid).encode()
    assert second.get() == str(second.pid).encode()
    assert [line for line in marker_lines(preloader) if line.startswith("loaded")] == [
        f"loaded {preloader.pid}"
    ]


def test_after_fork_hooks_run_in_each_forked_process_only(
    preload: Callable[..., Preloader],
) -> None:
    preloader = preload({"config.ru": HOOKS_APP})
    first, second = preloader.fork(), preloader.fork()
    assert marker_lines(preloader) == [
        f"loaded {preloader.pid}",
        f"after_fork {first.pid}",
        f"starting true {first.pid}",
        f"after_fork {second.pid}",
        f"starting true {second.pid}",
    ]
    first.control.close()
    assert preloader.receive() == ("EXITED", {"pid": first.pid, "status": 0})
    assert marker_lines(preloader)[-1] == f"stopping {first.pid}"


def test_direct_spawning_runs_passengers_hook_with_forked_false(tmp_path: Path) -> None:
    (tmp_path / "config.ru").write_text(textwrap.dedent(HOOKS_APP))
    shim = start_shim(tmp_path, tmp_path)
    try:
        tag, payload = shim.handshake(
            app_root=str(tmp_path), startup_file=str(tmp_path / "config.ru")
        )
        assert tag == "READY", payload
        pid = shim.process.pid
        assert (tmp_path / "marker").read_text().splitlines() == [
            f"loaded {pid}",
            f"starting false {pid}",
        ]
    finally:
        shim.stop()


def test_a_failing_after_fork_hook_fails_listen_in_that_process(
    preload: Callable[..., Preloader],
) -> None:
    app = """
        AppManager.after_fork { raise "no database in process #{Process.pid}" }
        run ->(env) { [200, {}, ["never"]] }
    """
    preloader = preload({"config.ru": app})
    forked = preloader.send_fork()
    tag, payload = forked.receive()
    assert (tag, payload["step"]) == ("ERROR", "LISTEN")
    assert payload["message"] == f"RuntimeError: no database in process {forked.pid}"
    assert preloader.receive() == ("EXITED", {"pid": forked.pid, "status": 1})
    assert preloader.shim.process.poll() is None


def test_exits_are_reported_with_the_status_or_the_negative_signal(
    preload: Callable[..., Preloader],
) -> None:
    preloader = preload(APPS / "echo_rack")
    crashing, killed = preloader.fork(), preloader.fork()
    connection = Connection(preloader.shim.listener)
    head = http_head("/app/crash")
    line = f"Q 1 K 192.0.2.7 54321 127.0.0.1 8000 http {len(head)} 0\n".encode()
    socket.send_fds(crashing.control, [line + head], [connection.server.fileno()])
    assert preloader.receive() == ("EXITED", {"pid": crashing.pid, "status": 7})
    connection.close()
    os.kill(killed.pid, signal.SIGKILL)
    assert preloader.receive() == ("EXITED", {"pid": killed.pid, "status": -9})
    # The core sees EOF: the preloader kept no copy of a forked process's channel.
    assert killed.control.recv(16) == b""
    # Both were the preloader's to reap; it can still fork.
    assert not psutil.pid_exists(crashing.pid) and not psutil.pid_exists(killed.pid)
    assert preloader.fork().get("/app/pid")


def test_a_malformed_command_is_ignored(preload: Callable[..., Preloader]) -> None:
    preloader = preload(APPS / "echo_rack")
    preloader.shim.control.send(b'FORK {"seq": 1}')  # no descriptors
    preloader.shim.control.send(b"HELLO")
    for payload in (b"5", b'{"seq": "one"}', b"{"):
        spare = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(2)]
        socket.send_fds(preloader.shim.control, [b"FORK " + payload], spare)
        for fd in spare:
            os.close(fd)
    assert preloader.fork().get("/app/pid")
    log = preloader.shim.log()
    assert log.count("ignoring a message that is not FORK with 2 or 3 fds") == 4
    assert "ignoring an unreadable FORK message" in log
    # The preloader closed the descriptors that came with them: only its stdin is /dev/null.
    assert list(fd_links(preloader.pid).values()).count(os.devnull) == 1


# Lifetimes


def test_eof_stops_the_preloader_and_leaves_its_processes_serving(
    preload: Callable[..., Preloader],
) -> None:
    preloader = preload(APPS / "echo_rack")
    forked = preloader.fork()
    preloader.shim.control.close()
    assert preloader.shim.process.wait(TIMEOUT) == 0
    # The runner, a subreaper like the core, inherits the process.
    assert psutil.Process(forked.pid).ppid() == os.getpid()
    assert forked.get("/app/pid") == str(forked.pid).encode()
    forked.control.close()
    assert reap(forked.pid) == 0


def test_a_process_whose_preloader_dies_keeps_serving_under_the_core(
    preload: Callable[..., Preloader],
) -> None:
    become_subreaper()
    preloader = preload(APPS / "echo_rack", core_pid=os.getpid())
    forked = preloader.fork()
    preloader.shim.process.kill()
    preloader.shim.process.wait(TIMEOUT)
    # Longer than two watchdog checks.
    time.sleep(WATCHDOG_LIMIT)
    assert psutil.Process(forked.pid).ppid() == os.getpid()
    assert forked.get("/app/pid") == str(forked.pid).encode()


def test_a_process_exits_within_a_second_when_the_core_is_gone(
    preload: Callable[..., Preloader],
) -> None:
    become_subreaper()
    # The core is another process: whoever inherits the forked process (this runner) is not it.
    preloader = preload(APPS / "echo_rack", core_pid=os.getppid())
    forked = preloader.fork()
    preloader.shim.process.kill()
    preloader.shim.process.wait(TIMEOUT)
    died = time.monotonic()
    assert reap(forked.pid) == 1
    assert time.monotonic() - died < WATCHDOG_LIMIT
    assert f"the core (pid {os.getppid()}) is gone" in preloader.shim.log()


# Failures and frameworks


def test_a_load_error_in_smart_mode_fails_load_app(tmp_path: Path) -> None:
    (tmp_path / "config.ru").write_text('require "no_such_library_for_appmanager_tests"\n')
    shim = start_shim(tmp_path, tmp_path)
    try:
        tag, payload = shim.handshake(
            app_root=str(tmp_path),
            startup_file=str(tmp_path / "config.ru"),
            spawn_method="smart",
            core_pid=os.getpid(),
        )
        assert (tag, payload["step"]) == ("ERROR", "LOAD_APP")
        assert "no_such_library_for_appmanager_tests" in payload["message"]
        assert shim.process.wait(TIMEOUT) == 1
    finally:
        shim.stop()


def test_an_unknown_spawn_method_fails_prepare(tmp_path: Path) -> None:
    (tmp_path / "config.ru").write_text(textwrap.dedent(HOOKS_APP))
    shim = start_shim(tmp_path, tmp_path)
    try:
        tag, payload = shim.handshake(
            app_root=str(tmp_path), startup_file=str(tmp_path / "config.ru"), spawn_method="lazy"
        )
        assert (tag, payload["step"]) == ("ERROR", "PREPARE")
        assert payload["message"] == 'AppManager::ProtocolError: unknown spawn_method "lazy"'
        assert shim.process.wait(TIMEOUT) == 1
    finally:
        shim.stop()


def test_a_rails_app_forks_and_serves(preload: Callable[..., Preloader]) -> None:
    need("action_controller/railtie")
    preloader = preload(APPS / "rails_app")
    first, second = preloader.fork(), preloader.fork()
    for forked in (first, second):
        assert forked.get() == b"Hello from Rails"
        shown = json.loads(forked.get("/items/42?q=x"))
        assert shown == {"id": "42", "q": "x", "path": "/items/42", "script_name": ""}
