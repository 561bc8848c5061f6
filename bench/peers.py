"""The servers the benchmarks compare: how to start each, find its core, and stop it.

Every peer is started in its own session (so a Ctrl-C in the terminal reaches only the benchmark
script, which then stops the peers itself) and listens on a free loopback port. `Peer.stop()` is
safe to call at any time, any number of times, and kills whatever the peer left behind.
"""

from __future__ import annotations

import contextlib
import grp
import http.client
import io
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
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


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection over a Unix socket (the host name only fills in the Host header)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        """Connect to the socket file instead of a TCP port."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def http_get_unix(path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Fetch `/` once over the Unix socket `path` and return (status, body)."""
    conn = UnixHTTPConnection(path, timeout)
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
                status, body = self.probe()
                if status == 200 and body == EXPECTED_BODY:
                    return
                last_error = f"HTTP {status} with body {body[:80]!r}"
            except OSError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
        raise PeerStartError(
            self._failure(f"did not serve {self.url} within {timeout:.0f} s ({last_error})")
        )

    def probe(self) -> tuple[int, bytes]:
        """Fetch the hello-world page once: (status, body)."""
        return http_get(self.host, self.port)

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

    #: The note for an app whose processes take whole connections (ASGI, Rack).
    WHOLE_CONNECTIONS = "whole connections handed to the app processes; keep-alive"

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

    def __init__(self, app_dir: Path, work_dir: Path, unix_socket: Path | None = None) -> None:
        super().__init__(app_dir, work_dir)
        #: Listen here instead of on a TCP port (behind nginx).
        self.unix_socket = unix_socket

    def command(self) -> list[str]:
        """`gunicorn -w 2 -b 127.0.0.1:P passenger_wsgi:application` (`-b unix:PATH` instead
        with a Unix socket)."""
        if self.unix_socket is not None:
            bind = f"unix:{self.unix_socket}"
        else:
            bind = f"{self.host}:{self.port}"
        cmd = [which_or_fail("gunicorn"), "-w", "2", "-b", bind]
        if gunicorn_has_option("--no-control-socket"):
            cmd.append("--no-control-socket")  # gunicorn >= 24 would write under ~/.gunicorn
        return [*cmd, "passenger_wsgi:application"]

    def probe(self) -> tuple[int, bytes]:
        """Fetch the page over the Unix socket when gunicorn listens on one."""
        if self.unix_socket is None:
            return super().probe()
        return http_get_unix(str(self.unix_socket))


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


#: Where Debian keeps Apache's modules (apxs -q LIBEXECDIR) and Passenger's locations file.
APACHE_MODULES_DIR = Path("/usr/lib/apache2/modules")
PASSENGER_ROOT = Path("/usr/lib/ruby/vendor_ruby/phusion_passenger/locations.ini")
#: Where harness.main exports the --appmanager-rev snapshot in its work dir.
SNAPSHOT_DIR = "appmanager-src"


def worker_user() -> tuple[str, str] | None:
    """The user and group a web server's workers run as when its master runs as root (nobody
    and its group, nginx's default); None when the benchmark does not run as root."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam("nobody")
    return entry.pw_name, grp.getgrgid(entry.pw_gid).gr_name


def open_to_workers(*dirs: Path) -> None:
    """Let a web server's workers, which run as nobody when the master runs as root, reach the
    files under `dirs`: the benchmark's temp dir is private (mode 0700), and a worker that cannot
    search it cannot reach the core's socket or the document root."""
    for path in dirs:
        os.chmod(path, os.stat(path).st_mode | 0o011)


def add_integrations(rev: str, work_dir: Path) -> None:
    """Add integrations/ as committed at `rev` to the --appmanager-rev snapshot in `work_dir`.

    harness.checkout_snapshot exports appmanager/ and spawners/ only; `appmanager nginx-module
    build` and `appmanager apache-module build` compile the modules from integrations/ beside
    the package, and fail without it.
    """
    snapshot = work_dir / SNAPSHOT_DIR
    if (snapshot / "integrations").is_dir():
        return
    archive = subprocess.run(
        ["git", "-C", str(repo_root()), "archive", "--format=tar", rev, "integrations"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if archive.returncode != 0:
        raise PeerStartError(
            f"--appmanager-rev {rev[:7]} has no integrations/: "
            + archive.stderr.decode(errors="replace").strip()
        )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(snapshot, filter="data")


def write_cli_wrapper(base_cmd: Sequence[str], path: Path) -> Path:
    """An executable at `path` that runs the appmanager CLI `base_cmd` with its arguments.

    A web server module takes one executable as the command that starts the core
    (`appmanager_core_command`), and it may start the core with a bare environment; the wrapper
    fixes PATH (and PYTHONPATH for an uninstalled checkout) to this script's.
    """
    lines = ["#!/bin/sh", f"PATH={shlex.quote(os.environ.get('PATH', ''))}", "export PATH"]
    if list(base_cmd) == CHECKOUT_CLI:
        pythonpath = os.pathsep.join(filter(None, [str(repo_root()), os.environ.get("PYTHONPATH")]))
        lines += [f"PYTHONPATH={shlex.quote(pythonpath)}", "export PYTHONPATH"]
    lines.append(f'exec {shlex.join(base_cmd)} "$@"')
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


def build_module(cli: Path, kind: str, out_dir: Path) -> Path:
    """Build appmanager's `kind` module ("nginx" or "apache") with `appmanager KIND-module build
    --output OUT_DIR`, which prints the module's path as its last line."""
    cmd = [str(cli), f"{kind}-module", "build", "--output", str(out_dir)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerStartError(f"`appmanager {kind}-module build` failed: {exc}") from exc
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        output = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise PeerStartError(
            f"`appmanager {kind}-module build` failed (exit status {result.returncode}): "
            f"{_last_line(output)}\n{output}"
        )
    return Path(lines[-1])


class AppManagerModule:
    """appmanager's module for one web server, built by the measured appmanager, and the command
    the module starts the core with (`write_cli_wrapper`)."""

    def __init__(
        self, kind: str, base_cmd: Sequence[str], peer_dir: Path, rev: str | None, work_dir: Path
    ) -> None:
        self.kind = kind  # "nginx" or "apache"
        self.base_cmd = list(base_cmd)
        #: --appmanager-rev (a full hash): the snapshot in `work_dir` gets the modules' sources.
        self.rev = rev
        self.work_dir = work_dir
        self.cli = peer_dir / "appmanager"
        self.out_dir = peer_dir / "module"
        self.path: Path | None = None

    def build(self) -> Path:
        """Build the module (PeerStartError when it fails) and return its path."""
        if self.rev is not None:
            add_integrations(self.rev, self.work_dir)
        write_cli_wrapper(self.base_cmd, self.cli)
        self.path = build_module(self.cli, self.kind, self.out_dir)
        return self.path


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


def _process_name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def _is_appmanager_core(proc: psutil.Process) -> bool:
    """Whether `proc` is an `appmanager core --socket ...` started by a web server module."""
    try:
        args = proc.cmdline()
    except psutil.Error:
        return False
    return "core" in args and "--socket" in args


class WebServerPeer(ForegroundPeer):
    """A web server (nginx or Apache) in the foreground, with a configuration file of its own in
    the peer's work dir, in front of the app processes.

    Its core CPU is that of everything between the clients and the app processes: the web
    server's processes (which `is_server_process` recognizes) and, for a module that hands the
    requests to a core of its own, that core (`is_core_process`). The app processes are not
    counted.
    """

    #: The file the configuration is written to, in the work dir.
    config_name = ""

    def __init__(self, app_dir: Path, work_dir: Path, note: str | None = None) -> None:
        super().__init__(app_dir, work_dir, note)
        self.config_file = self.work_dir / self.config_name
        self.error_log = self.work_dir / "error.log"
        self.docroot = self.work_dir / "htdocs"
        self.benchmark_dir = work_dir

    @abstractmethod
    def config(self) -> str:
        """The web server's configuration."""

    @abstractmethod
    def is_server_process(self, proc: psutil.Process) -> bool:
        """Whether `proc` (a descendant of the main process) is one of the web server's."""

    def is_core_process(self, proc: psutil.Process) -> bool:
        """Whether `proc` is a core that the web server hands the requests to (none here)."""
        return False

    def prepare(self) -> None:
        """What the configuration needs before the web server starts (a module, an upstream)."""

    def start(self) -> None:
        """Write the configuration where the workers can read what it names, then start."""
        open_to_workers(self.benchmark_dir, self.work_dir)
        self.docroot.mkdir(exist_ok=True)
        self.prepare()
        self.config_file.write_text(self.config())
        super().start()

    def spawn_cwd(self) -> Path:
        """The work dir: the web server has no business in the app's."""
        return self.work_dir

    def core_processes(self) -> list[psutil.Process]:
        """The web server's processes and its core, among the main process's descendants."""
        pid = self.main_pid()
        if pid is None:
            return []
        return [p for p in descendants(pid) if self.is_server_process(p) or self.is_core_process(p)]

    def logs(self) -> tuple[Path, ...]:
        """The web server's output and its error log."""
        return (self.log_path, self.error_log)

    def stop(self) -> None:
        """Stop the web server, give a core it started the time to notice (its lifeline) and stop
        on its own, then kill whatever of the web server's is left."""
        popen = self._popen
        if popen is None:
            return
        procs = descendants(popen.pid) if popen.poll() is None else []
        cores = [p for p in procs if self.is_core_process(p)]
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"  {self.name}: no exit {STOP_TIMEOUT_S:.0f} s after SIGTERM, killing")
        _, alive = psutil.wait_procs(cores, timeout=STOP_TIMEOUT_S)
        if alive:
            print(f"  {self.name}: its core did not stop with the web server, killing it")
        super().stop()
        kill_leftovers(procs)


class AppManagerModulePeer(WebServerPeer):
    """A web server with appmanager's module, which starts `appmanager core` with the web server
    and hands it the requests: the module built by the measured appmanager's CLI, and the same
    settings whichever web server, each spelled by it (`directive`)."""

    #: The web server ("nginx" or "apache"), for `appmanager KIND-module build`.
    server = ""

    def __init__(
        self,
        app_dir: Path,
        work_dir: Path,
        base_cmd: list[str],
        python: str,
        rev: str | None = None,
    ) -> None:
        super().__init__(app_dir, work_dir)
        self.python = python
        self.module = AppManagerModule(self.server, base_cmd, self.work_dir, rev, work_dir)

    @abstractmethod
    def directive(self, setting: str, value: str | int | bool | Path) -> str:
        """The module's directive that sets `setting` (a name of appmanager's settings)."""

    def prepare(self) -> None:
        """Build the module with the measured appmanager's CLI."""
        self.module.build()

    def core_directives(self) -> list[str]:
        """The core's settings: its instance dir, 2 app processes, the CLI to start it with."""
        return [
            self.directive("instance_dir", self.work_dir / "instance"),
            self.directive("max_pool_size", 2),
            self.directive("core_command", self.module.cli),
        ]

    def app_directives(self) -> list[str]:
        """The app, as Passenger's directives would name it."""
        return [
            self.directive("enabled", True),
            self.directive("app_root", self.app_dir),
            self.directive("python", self.python),
            self.directive("min_instances", 2),
            # As root, the core would run the app as its owner, or nobody, who may not reach
            # the interpreter; the data path measured here is the same either way.
            *([self.directive("user_switching", False)] if os.geteuid() == 0 else []),
        ]

    def is_core_process(self, proc: psutil.Process) -> bool:
        """The core the module started."""
        return _is_appmanager_core(proc)


class NginxPeer(WebServerPeer):
    """nginx, master and `worker_processes auto` (one per CPU), no access log; subclasses say
    what the server block does with the requests."""

    config_name = "nginx.conf"

    def command(self) -> list[str]:
        """`nginx -p RUN/ -c RUN/nginx.conf -e RUN/error.log` (`daemon off` in the file)."""
        return [
            which_or_fail("nginx"),
            "-p",
            f"{self.work_dir}/",
            "-c",
            str(self.config_file),
            "-e",
            str(self.error_log),
        ]

    def main_directives(self) -> list[str]:
        """Directives of the main context (load_module)."""
        return []

    def http_directives(self) -> list[str]:
        """Directives of the http block."""
        return []

    @abstractmethod
    def server_directives(self) -> list[str]:
        """Directives of the server block: what serves the requests."""

    def config(self) -> str:
        """A self-contained nginx.conf: everything nginx writes goes to the work dir."""
        run = self.work_dir
        user = worker_user()
        lines = [
            "# Written by bench/peers.py for one benchmark run.",
            "daemon off;",
            "master_process on;",
            "worker_processes auto;",
            f"pid {run}/nginx.pid;",
            f"error_log {self.error_log} warn;",
            *([f"user {user[0]} {user[1]};"] if user else []),
            *self.main_directives(),
            "events {",
            "    worker_connections 1024;",
            "}",
            "http {",
            "    access_log off;",
            *(f"    {kind}_temp_path {run}/{kind}_temp;" for kind in _NGINX_TEMP_PATHS),
            *(f"    {line}" for line in self.http_directives()),
            "    server {",
            f"        listen {self.host}:{self.port};",
            "        server_name localhost;",
            f"        root {self.docroot};",
            *(f"        {line}" for line in self.server_directives()),
            "    }",
            "}",
        ]
        return "\n".join(lines) + "\n"

    def is_server_process(self, proc: psutil.Process) -> bool:
        """nginx's master and workers."""
        return _process_name(proc) == "nginx"


_NGINX_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


class NginxAppManagerPeer(AppManagerModulePeer, NginxPeer):
    """nginx with appmanager's module (`appmanager_enabled on`), which starts `appmanager core`
    with nginx and hands it every request over the core's Unix socket."""

    name = "appmanager"
    server = "nginx"
    note = "nginx + appmanager's module → appmanager core (Unix socket) → app processes"
    core_description = (
        "nginx's master and worker processes and the `appmanager core` process that the module "
        "started; the app processes (the core's children) are not counted"
    )

    def directive(self, setting: str, value: str | int | bool | Path) -> str:
        """`appmanager_<setting> VALUE;`."""
        shown = ("on" if value else "off") if isinstance(value, bool) else value
        return f"appmanager_{setting} {shown};"

    def main_directives(self) -> list[str]:
        """Load the module."""
        return [f"load_module {self.module.path};"]

    def http_directives(self) -> list[str]:
        """The core's settings."""
        return self.core_directives()

    def server_directives(self) -> list[str]:
        """The app."""
        return self.app_directives()


class NginxGunicornPeer(NginxPeer):
    """nginx `proxy_pass` to gunicorn -w 2 on a Unix socket, with a keepalive upstream."""

    name = "gunicorn"
    note = (
        "nginx proxy_pass → gunicorn -w 2 (Unix socket); gunicorn's sync workers close every "
        "upstream connection"
    )
    core_description = (
        "nginx's master and worker processes; gunicorn's workers are the app processes and its "
        "arbiter is idle: not counted"
    )

    def __init__(self, app_dir: Path, work_dir: Path) -> None:
        super().__init__(app_dir, work_dir)
        self.upstream_socket = self.work_dir / "gunicorn.sock"
        self.upstream = GunicornPeer(app_dir, self.work_dir, unix_socket=self.upstream_socket)

    def describe_command(self) -> str:
        """gunicorn's command line, then nginx's."""
        return f"{self.upstream.describe_command()}; {super().describe_command()}"

    def prepare(self) -> None:
        """Start gunicorn first: nginx then finds its socket ready."""
        self.upstream.start()

    def http_directives(self) -> list[str]:
        """The upstream with a pool of idle connections (ANCHORS.md's `keepalive 8`)."""
        return [
            "upstream gunicorn {",
            f"    server unix:{self.upstream_socket};",
            "    keepalive 8;",
            "}",
        ]

    def server_directives(self) -> list[str]:
        """Proxy everything to gunicorn over HTTP/1.1, so that the pool can keep connections."""
        return [
            "location / {",
            "    proxy_pass http://gunicorn;",
            "    proxy_http_version 1.1;",
            '    proxy_set_header Connection "";',
            "    proxy_set_header Host $http_host;",
            "}",
        ]

    def is_alive(self) -> bool:
        """Whether nginx and gunicorn both still run."""
        return super().is_alive() and self.upstream.is_alive()

    def stop(self) -> None:
        """Stop nginx, then gunicorn."""
        try:
            super().stop()
        finally:
            self.upstream.stop()

    def logs(self) -> tuple[Path, ...]:
        """nginx's output and error log, and gunicorn's output."""
        return (*super().logs(), self.upstream.log_path)


class ApachePeer(WebServerPeer):
    """Apache (event MPM with Debian's settings, keep-alive as Debian's apache2.conf has it, no
    access log) from a self-contained httpd.conf; subclasses add their module."""

    config_name = "httpd.conf"

    def command(self) -> list[str]:
        """`apache2 -DFOREGROUND -f RUN/httpd.conf`."""
        return [which_or_fail("apache2"), "-DFOREGROUND", "-f", str(self.config_file)]

    def modules(self) -> list[tuple[str, Path]]:
        """(name, file) of the modules to load beside the MPM, authz_core and mime."""
        return []

    def server_directives(self) -> list[str]:
        """Directives of the main server (the module's own settings)."""
        return []

    @abstractmethod
    def vhost_directives(self) -> list[str]:
        """Directives of the virtual host: the app."""

    def config(self) -> str:
        """A self-contained httpd.conf: everything Apache writes goes to the work dir."""
        run = self.work_dir
        user = worker_user()
        modules = [
            ("mpm_event_module", APACHE_MODULES_DIR / "mod_mpm_event.so"),
            ("authz_core_module", APACHE_MODULES_DIR / "mod_authz_core.so"),
            ("mime_module", APACHE_MODULES_DIR / "mod_mime.so"),
            *self.modules(),
        ]
        lines = [
            "# Written by bench/peers.py for one benchmark run.",
            f'ServerRoot "{run}"',
            f'PidFile "{run}/httpd.pid"',
            f'DefaultRuntimeDir "{run}"',
            f'Mutex "file:{run}" default',
            f'ErrorLog "{self.error_log}"',
            "LogLevel warn",
            f"Listen {self.host}:{self.port}",
            f"ServerName {self.host}",
            *([f"User {user[0]}", f"Group {user[1]}"] if user else []),
            *(f'LoadModule {name} "{path}"' for name, path in modules),
            "TypesConfig /etc/mime.types",
            "Timeout 300",
            "KeepAlive On",
            "MaxKeepAliveRequests 100",
            "KeepAliveTimeout 5",
            "StartServers 2",
            "MinSpareThreads 25",
            "MaxSpareThreads 75",
            "ThreadLimit 64",
            "ThreadsPerChild 25",
            "MaxRequestWorkers 150",
            "MaxConnectionsPerChild 0",
            *self.server_directives(),
            "<Directory />",
            "    AllowOverride None",
            "    Require all denied",
            "</Directory>",
            f"<VirtualHost {self.host}:{self.port}>",
            f'    DocumentRoot "{self.docroot}"',
            f'    <Directory "{self.docroot}">',
            "        Require all granted",
            "    </Directory>",
            *(f"    {line}" for line in self.vhost_directives()),
            "</VirtualHost>",
        ]
        return "\n".join(lines) + "\n"

    def is_server_process(self, proc: psutil.Process) -> bool:
        """Apache's master and children."""
        return _process_name(proc) == "apache2"


class ApacheAppManagerPeer(AppManagerModulePeer, ApachePeer):
    """Apache with appmanager's module (`AppManagerEnabled On`), which starts `appmanager core`
    with Apache and hands it every request through mod_proxy_http's pooled connections."""

    name = "appmanager"
    server = "apache"
    note = (
        "Apache + appmanager's module (through mod_proxy_http) → appmanager core (Unix socket) "
        "→ app processes"
    )
    core_description = (
        "Apache's master and child processes and the `appmanager core` process that the module "
        "started; the app processes (the core's children) are not counted"
    )

    def directive(self, setting: str, value: str | int | bool | Path) -> str:
        """`AppManager<Setting> VALUE`, a path or a word quoted."""
        name = "AppManager" + "".join(word.capitalize() for word in setting.split("_"))
        if isinstance(value, bool):
            return f"{name} {'On' if value else 'Off'}"
        return f"{name} {value}" if isinstance(value, int) else f'{name} "{value}"'

    def modules(self) -> list[tuple[str, Path]]:
        """mod_proxy and mod_proxy_http (the module's transport), and the module."""
        assert self.module.path is not None
        return [
            ("proxy_module", APACHE_MODULES_DIR / "mod_proxy.so"),
            ("proxy_http_module", APACHE_MODULES_DIR / "mod_proxy_http.so"),
            ("appmanager_module", self.module.path),
        ]

    def server_directives(self) -> list[str]:
        """The core's settings."""
        return self.core_directives()

    def vhost_directives(self) -> list[str]:
        """The app."""
        return self.app_directives()


class ApachePassengerPeer(ApachePeer):
    """Apache with Phusion Passenger's module, which runs its watchdog and core with Apache."""

    name = "mod_passenger"
    note = "Apache + mod_passenger → Passenger core (C++, Unix socket) → app processes"
    core_description = (
        "Apache's master and child processes and the 'Passenger core' process under the "
        "Passenger watchdog; the watchdog and the app processes are not counted"
    )

    def __init__(self, app_dir: Path, work_dir: Path, python: str) -> None:
        super().__init__(app_dir, work_dir)
        self.python = python
        self.registry_dir = self.work_dir / "registry"
        self.tmp_dir = self.work_dir / "tmp"

    def prepare(self) -> None:
        """Passenger's instance registry and temp dir (its spawn dirs) go to the work dir."""
        if not PASSENGER_ROOT.is_file():
            raise PeerStartError(f"no Passenger at {PASSENGER_ROOT} (apt-get install passenger)")
        self.registry_dir.mkdir(exist_ok=True)
        self.tmp_dir.mkdir(exist_ok=True)

    def spawn_env(self) -> dict[str, str] | None:
        """TMPDIR in the work dir, for what Passenger writes there."""
        return dict(os.environ, TMPDIR=str(self.tmp_dir))

    def modules(self) -> list[tuple[str, Path]]:
        """mod_passenger."""
        return [("passenger_module", APACHE_MODULES_DIR / "mod_passenger.so")]

    def server_directives(self) -> list[str]:
        """Passenger's installation, registry and pool size (ANCHORS.md)."""
        return [
            f'PassengerRoot "{PASSENGER_ROOT}"',
            "PassengerDefaultRuby /usr/bin/ruby",
            f'PassengerInstanceRegistryDir "{self.registry_dir}"',
            "PassengerMaxPoolSize 2",
            "PassengerDisableSecurityUpdateCheck on",
            "PassengerDisableAnonymousTelemetry on",
            # As root, Passenger would run the app as nobody (its files are root's), who may not
            # reach the interpreter; as for appmanager, the app runs as root.
            *(
                [
                    "PassengerUserSwitching off",
                    "PassengerDefaultUser root",
                    "PassengerDefaultGroup root",
                ]
                if os.geteuid() == 0
                else []
            ),
        ]

    def vhost_directives(self) -> list[str]:
        """The app: a WSGI app with 2 processes in the production environment."""
        return [
            f'PassengerAppRoot "{self.app_dir}"',
            "PassengerAppType wsgi",
            "PassengerStartupFile passenger_wsgi.py",
            f'PassengerPython "{self.python}"',
            "PassengerMinInstances 2",
            "PassengerAppEnv production",
        ]

    def is_core_process(self, proc: psutil.Process) -> bool:
        """The Passenger core (under the watchdog, a child of Apache's master)."""
        return _is_passenger_core(proc)


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
