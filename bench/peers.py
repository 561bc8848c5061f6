"""The servers the benchmarks compare: how to start each, find its core, and stop it.

Every peer is started in its own session (so a Ctrl-C in the terminal reaches only the benchmark
script, which then stops the peers itself) and listens on a free loopback port. `Peer.stop()` is
safe to call at any time, any number of times, and kills whatever the peer left behind.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import psutil

EXPECTED_BODY = b"Hello, world!\n"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


class PeerStartError(RuntimeError):
    """A peer did not start or did not answer the hello-world request in time."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (bind to port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(host: str, port: int, timeout: float = 2.0) -> tuple[int, bytes]:
    """Fetch `/` once and return (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def tail(path: Path, lines: int = 15) -> str:
    """Return the last lines of a log file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.rstrip().splitlines()[-lines:])


def kill_leftovers(procs: list[psutil.Process], timeout: float = 5.0) -> None:
    """TERM, then KILL, the processes of `procs` that still run (pid reuse is detected)."""
    alive = [p for p in procs if p.is_running()]
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(alive, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout)


def descendants(pid: int) -> list[psutil.Process]:
    """The process `pid` and all its descendants, or [] when it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of `procs` themselves (not of their children)."""
    total = 0.0
    for proc in procs:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


class Peer(ABC):
    """One server under test, serving the hello-world app with 2 app processes.

    `note` may be given per instance (what differs for the app's language); else the class's.
    """

    name: str = ""
    #: What the table prints next to the figures (caveats of the comparison).
    note: str = ""
    #: Which processes count as this peer's "core" for CPU per request.
    core_description: str = ""
    #: Whether a core sits between the clients and the app processes (False: nothing to measure).
    has_core: bool = True

    def __init__(self, app_dir: Path, work_dir: Path, note: str | None = None) -> None:
        self.app_dir = app_dir
        self.work_dir = work_dir / self.name
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if note is not None:
            self.note = note
        self.host = "127.0.0.1"
        self.port = free_port()
        self.log_path = self.work_dir / "server.log"
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The hello-world URL of this peer."""
        return f"http://{self.host}:{self.port}/"

    @abstractmethod
    def command(self) -> list[str]:
        """The command line that starts the peer."""

    @abstractmethod
    def start(self) -> None:
        """Start the peer and wait until it serves the hello-world body; raise PeerStartError."""

    def core_processes(self) -> list[psutil.Process]:
        """The processes whose CPU time counts as the core's: none for a peer without a core
        (``has_core`` False); peers with one say which."""
        if self.has_core:
            raise NotImplementedError(f"{type(self).__name__} must name its core processes")
        return []

    @abstractmethod
    def stop(self) -> None:
        """Stop the peer and everything it started; never raises for already-stopped peers."""

    @abstractmethod
    def is_alive(self) -> bool:
        """Whether the peer's main process still runs."""

    def describe_command(self) -> str:
        """The start command as a shell line, for reports."""
        return shlex.join(self.command())

    def _spawn(self, cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        """Start `cmd` in a new session with its output going to the peer's log file."""
        with self.log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Poll the URL until it answers 200 with the expected body, or fail with the log tail."""
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if not self.is_alive():
                raise PeerStartError(self._failure(f"exited during start{self._exit_note()}"))
            try:
                status, body = http_get(self.host, self.port)
                if status == 200 and body == EXPECTED_BODY:
                    return
                last_error = f"HTTP {status} with body {body[:80]!r}"
            except OSError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
        raise PeerStartError(
            self._failure(f"did not serve {self.url} within {timeout:.0f} s ({last_error})")
        )

    def _exit_note(self) -> str:
        """How the main process ended, for a failure message ("" when unknown)."""
        return ""

    def logs(self) -> tuple[Path, ...]:
        """The log files whose tails explain a failure."""
        return (self.log_path,)

    def _failure(self, what: str, *logs: Path) -> str:
        """A failure message: a one-line summary ending with the log's last line, then its tail."""
        logs = logs or self.logs()
        tails = [tail(log) for log in logs]
        last_line = next((t.splitlines()[-1] for t in reversed(tails) if t.strip()), "")
        summary = f"{self.name} {what}" + (f": {last_line.strip()}" if last_line.strip() else "")
        return "\n".join([summary, *tails])


class ForegroundPeer(Peer):
    """A peer whose main process stays in the foreground and stops on SIGTERM."""

    def start(self) -> None:
        """Start the command in the app dir and wait until it serves."""
        try:
            self._spawn(self.command(), cwd=self.spawn_cwd(), env=self.spawn_env())
        except OSError as exc:
            raise PeerStartError(f"{self.name}: cannot run {self.command()[0]}: {exc}") from exc
        self._wait_ready()

    def spawn_cwd(self) -> Path:
        """Working directory of the main process."""
        return self.app_dir

    def spawn_env(self) -> dict[str, str] | None:
        """Environment of the main process (None: inherit)."""
        return None

    def is_alive(self) -> bool:
        """Whether the main process still runs."""
        return self._popen is not None and self._popen.poll() is None

    def _exit_note(self) -> str:
        """The main process's exit status (or the signal that ended it)."""
        rc = self._popen.poll() if self._popen is not None else None
        if rc is None:
            return ""
        return f" (killed by signal {-rc})" if rc < 0 else f" (exit status {rc})"

    def main_pid(self) -> int | None:
        """Pid of the process this script started."""
        return self._popen.pid if self._popen is not None else None

    def stop(self) -> None:
        """SIGTERM the main process, wait, then kill its process group and any leftovers."""
        popen = self._popen
        if popen is None:
            return
        leftovers = descendants(popen.pid) if popen.poll() is None else []
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"  {self.name}: no exit {STOP_TIMEOUT_S:.0f} s after SIGTERM, killing")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait(timeout=STOP_TIMEOUT_S)
        kill_leftovers(leftovers)
        self._popen = None


class AppManagerPeer(ForegroundPeer):
    """`appmanager start` serving HTTP itself; its core is the process this script starts."""

    name = "appmanager"
    note = "fd handoff; keep-alive"
    core_description = (
        "the `appmanager start` process itself (the core); its app processes are its children "
        "and are not counted"
    )

    def __init__(
        self,
        app_dir: Path,
        work_dir: Path,
        base_cmd: list[str],
        extra_args: Sequence[str] = (),
        note: str | None = None,
    ) -> None:
        super().__init__(app_dir, work_dir, note)
        self.base_cmd = base_cmd
        self.extra_args = list(extra_args)  # e.g. ["--ruby", "/usr/bin/ruby"]
        self.instance_dir = self.work_dir / "instance"

    def command(self) -> list[str]:
        """`appmanager start APP_DIR ...` with 2 app processes on a free port."""
        return [
            *self.base_cmd,
            "start",
            str(self.app_dir),
            "--address",
            self.host,
            "--port",
            str(self.port),
            "--min-instances",
            "2",
            "--max-pool-size",
            "2",
            "--instance-dir",
            str(self.instance_dir),
            # As root, appmanager would run the app as its owner (nobody here), who may not reach
            # the interpreter; the data path measured here is the same either way.
            *(["--user-switching", "off"] if os.geteuid() == 0 else []),
            *self.extra_args,
        ]

    def start(self) -> None:
        """Create a private instance dir, then start the core."""
        self.instance_dir.mkdir(mode=0o700, exist_ok=True)
        super().start()

    def spawn_cwd(self) -> Path:
        """Run outside the checkout, so that only the installed package (if any) is imported."""
        return self.work_dir

    def spawn_env(self) -> dict[str, str] | None:
        """Inherit the environment; an uninstalled checkout gets its root on PYTHONPATH."""
        if self.base_cmd != CHECKOUT_CLI:
            return None
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root()), env.get("PYTHONPATH")]))
        return env

    def core_processes(self) -> list[psutil.Process]:
        """The core is the process started by this script."""
        pid = self.main_pid()
        return [psutil.Process(pid)] if pid is not None else []


class GunicornPeer(ForegroundPeer):
    """gunicorn with 2 sync workers: a baseline with no core in the data path."""

    name = "gunicorn"
    note = "sync workers close every connection (a new TCP connection per request)"
    core_description = "none: clients connect to the workers directly (the arbiter is idle)"
    has_core = False

    def command(self) -> list[str]:
        """`gunicorn -w 2 -b 127.0.0.1:P passenger_wsgi:application`."""
        cmd = [which_or_fail("gunicorn"), "-w", "2", "-b", f"{self.host}:{self.port}"]
        if gunicorn_has_option("--no-control-socket"):
            cmd.append("--no-control-socket")  # gunicorn >= 24 would write under ~/.gunicorn
        return [*cmd, "passenger_wsgi:application"]


class PumaPeer(ForegroundPeer):
    """puma in cluster mode, 2 workers of 1 thread each: no core in the data path."""

    name = "puma"
    note = "2 workers × 1 thread; keep-alive, but closes a connection after 10 requests when busy"
    core_description = (
        "none: clients connect to the workers directly (the master only supervises them)"
    )
    has_core = False

    def __init__(self, app_dir: Path, work_dir: Path, ruby: str) -> None:
        super().__init__(app_dir, work_dir)
        self.ruby = ruby

    def command(self) -> list[str]:
        """`puma -b tcp://127.0.0.1:P -w 2 -t 1:1 -e production config.ru`, run by `ruby`."""
        return [
            self.ruby,
            which_or_fail("puma"),
            "-b",
            f"tcp://{self.host}:{self.port}",
            "-w",
            "2",
            "-t",
            "1:1",
            "-e",
            "production",
            "config.ru",
        ]


class UnicornPeer(ForegroundPeer):
    """unicorn with `worker_processes 2`: no core in the data path, no keep-alive."""

    name = "unicorn"
    note = "closes every connection (`Connection: close`: a new TCP connection per request)"
    core_description = (
        "none: clients connect to the workers directly (the master only supervises them)"
    )
    has_core = False

    def __init__(self, app_dir: Path, work_dir: Path, ruby: str) -> None:
        super().__init__(app_dir, work_dir)
        self.ruby = ruby
        self.config_file = self.work_dir / "unicorn.conf.rb"

    def command(self) -> list[str]:
        """`unicorn -l 127.0.0.1:P -E production -c CONF config.ru`, run by `ruby`."""
        return [
            self.ruby,
            which_or_fail("unicorn"),
            "-l",
            f"{self.host}:{self.port}",
            "-E",
            "production",
            "-c",
            str(self.config_file),
            "config.ru",
        ]

    def start(self) -> None:
        """Write the config file (2 workers), then start the master."""
        self.config_file.write_text("worker_processes 2\n")
        super().start()


class NodeClusterPeer(ForegroundPeer):
    """The app under Node's cluster module, 2 workers sharing one port: the bare baseline."""

    name = "cluster"
    note = "node cluster.js: 2 workers share the port; keep-alive"
    core_description = (
        "none: the primary accepts each connection and hands it to a worker (round-robin, "
        "once per connection); requests go to the workers only"
    )
    has_core = False

    def __init__(self, app_dir: Path, work_dir: Path, nodejs: str) -> None:
        super().__init__(app_dir, work_dir)
        self.nodejs = nodejs

    def command(self) -> list[str]:
        """`node cluster.js` (PORT and WORKERS=2 come in the environment)."""
        return [self.nodejs, "cluster.js"]

    def describe_command(self) -> str:
        """The start command with its environment, for reports."""
        return f"PORT={self.port} WORKERS=2 {shlex.join(self.command())}"

    def spawn_env(self) -> dict[str, str] | None:
        """The port and the number of workers."""
        return dict(os.environ, PORT=str(self.port), WORKERS="2", NODE_ENV="production")


class UvicornPeer(ForegroundPeer):
    """uvicorn with 2 worker processes (uvloop and httptools when installed), access log off."""

    name = "uvicorn"
    note = "2 workers; keep-alive; access log off"
    core_description = (
        "none: clients connect to the workers directly (the parent only supervises them)"
    )
    has_core = False

    def __init__(self, app_dir: Path, work_dir: Path, python: str) -> None:
        super().__init__(app_dir, work_dir)
        self.python = python

    def command(self) -> list[str]:
        """`python -m uvicorn --host 127.0.0.1 --port P --workers 2 --no-access-log app:app`."""
        return [
            self.python,
            "-m",
            "uvicorn",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "2",
            "--no-access-log",
            "app:app",
        ]


class PassengerPeer(Peer):
    """Phusion Passenger standalone, builtin engine, daemonized into a private temp dir."""

    name = "passenger"
    note = "builtin engine (C++ core proxies every request); keep-alive"
    core_description = (
        "the 'Passenger core' process(es) among the descendants of the Passenger watchdog "
        "(the builtin engine serves HTTP, routes and proxies there); the watchdog and the app "
        "processes are not counted"
    )

    def __init__(
        self,
        app_dir: Path,
        work_dir: Path,
        interpreter_args: Sequence[str],
        note: str | None = None,
    ) -> None:
        super().__init__(app_dir, work_dir, note)
        self.interpreter_args = list(interpreter_args)  # e.g. ["--python", "/usr/bin/python3"]
        self.pid_file = self.work_dir / "passenger.pid"
        self.registry_dir = self.work_dir / "registry"
        self.tmp_dir = self.work_dir / "tmp"
        self.server_log = self.work_dir / "passenger.log"

    def command(self) -> list[str]:
        """`passenger start --engine=builtin ... --daemonize` with 2 app processes."""
        return [
            which_or_fail("passenger"),
            "start",
            "--engine=builtin",
            "--address",
            self.host,
            "--port",
            str(self.port),
            "--instance-registry-dir",
            str(self.registry_dir),
            "--daemonize",
            "--pid-file",
            str(self.pid_file),
            "--log-file",
            str(self.server_log),
            "--disable-security-update-check",
            "--disable-anonymous-telemetry",
            "--min-instances",
            "2",
            "--max-pool-size",
            "2",
            "--environment",
            "production",
            *self.interpreter_args,
        ]

    def start(self) -> None:
        """Run `passenger start --daemonize`, then wait until the daemon serves."""
        self.registry_dir.mkdir(exist_ok=True)
        self.tmp_dir.mkdir(exist_ok=True)
        env = dict(os.environ, TMPDIR=str(self.tmp_dir))  # its standalone temp dir goes here
        try:
            self._spawn(self.command(), cwd=self.app_dir, env=env)
        except OSError as exc:
            raise PeerStartError(f"passenger: cannot run passenger: {exc}") from exc
        assert self._popen is not None
        try:
            rc = self._popen.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise PeerStartError(self._failure("`passenger start` hung")) from exc
        if rc != 0:
            raise PeerStartError(self._failure(f"`passenger start` exited with {rc}"))
        self._wait_ready()

    def logs(self) -> tuple[Path, ...]:
        """The output of `passenger start` and the server's own log."""
        return (self.log_path, self.server_log)

    def watchdog_pid(self) -> int | None:
        """Pid of the Passenger watchdog, read from the pid file."""
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def is_alive(self) -> bool:
        """Whether the watchdog still runs."""
        pid = self.watchdog_pid()
        return pid is not None and psutil.pid_exists(pid)

    def core_processes(self) -> list[psutil.Process]:
        """Descendants of the watchdog whose command line names them the core."""
        pid = self.watchdog_pid()
        if pid is None:
            return []
        return [p for p in descendants(pid)[1:] if _is_passenger_core(p)]

    def _own_processes(self) -> list[psutil.Process]:
        """The watchdog tree plus helpers whose command line mentions our private work dir."""
        pid = self.watchdog_pid()
        procs = descendants(pid) if pid is not None else []
        marker = str(self.work_dir)
        for proc in psutil.process_iter(["cmdline"]):
            if any(marker in arg for arg in proc.info["cmdline"] or []):
                procs.append(proc)
        return procs

    def stop(self) -> None:
        """`passenger stop --pid-file`, then kill whatever of this instance is left."""
        leftovers = self._own_processes()
        if self.is_alive():
            try:
                subprocess.run(
                    [which_or_fail("passenger"), "stop", "--pid-file", str(self.pid_file)],
                    cwd=self.app_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=STOP_TIMEOUT_S,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired):
                print("  passenger: `passenger stop` failed, killing its processes")
            psutil.wait_procs([p for p in leftovers if p.is_running()], timeout=STOP_TIMEOUT_S)
        if self._popen is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._popen.pid, signal.SIGKILL)
            self._popen.wait(timeout=STOP_TIMEOUT_S)
            self._popen = None
        kill_leftovers(leftovers)


def _is_passenger_core(proc: psutil.Process) -> bool:
    """Whether `proc` is a Passenger core ('Passenger core' / 'PassengerAgent core')."""
    try:
        words = " ".join(arg for arg in proc.cmdline() if arg).split()
    except psutil.Error:
        return False
    return bool(words) and "passenger" in words[0].lower() and "core" in words[1:2]


def which_or_fail(program: str) -> str:
    """Absolute path of `program` on PATH; PeerStartError when it is missing."""
    path = shutil.which(program)
    if path is None:
        raise PeerStartError(f"`{program}` is not on PATH")
    return path


_GUNICORN_HELP: str | None = None


def gunicorn_has_option(option: str) -> bool:
    """Whether the installed gunicorn knows a command-line option."""
    global _GUNICORN_HELP
    if _GUNICORN_HELP is None:
        result = subprocess.run(
            [which_or_fail("gunicorn"), "--help"], capture_output=True, text=True, timeout=30
        )
        _GUNICORN_HELP = result.stdout
    return option in _GUNICORN_HELP


def repo_root() -> Path:
    """The repository root (the parent of bench/)."""
    return Path(__file__).resolve().parent.parent


#: Runs the CLI of this checkout when appmanager is not installed (PYTHONPATH is set for it).
CHECKOUT_CLI = [sys.executable, "-c", "from appmanager.cli import main; main()"]


def default_appmanager_cmd() -> list[str]:
    """`appmanager` from PATH (e.g. `pip install -e .`), else the checkout's CLI."""
    path = shutil.which("appmanager")
    return [path] if path is not None else CHECKOUT_CLI
