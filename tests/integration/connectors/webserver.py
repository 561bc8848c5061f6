"""What the connector tests share, whichever web server runs them.

The shared suite (``test_connector_suite.py``) describes the apps to serve as ``Mount``s and runs
against every kind of web server in its ``WEB_SERVERS`` list: each kind renders its own
configuration from the mounts, starts the real web server with appmanager's module, and stops
it (with the core and the apps) at the end. As root, the web server's workers run as another
user, so apps and document roots live in world-readable temporary directories.

``ServerProcess``, ``ServerFactory`` and ``ServerKind`` are what nginx.py and apache.py build
on: running a web server in the foreground from a run directory of its own, waiting until it
serves, finding the core its module started, stopping it and waiting for the core and its apps,
and removing every directory at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import psutil
from conftest import APPS, Response, free_port, request

from appmanager import connectorconf

CONNECTOR_APPS = Path(__file__).resolve().parent / "apps"


@dataclass
class Mount:
    """One app behind the web server: its root (files in its public/ are the web server's to
    serve), the server name it answers to, an optional sub-URI, and app settings by setting
    name as directive text ("on"/"off" for booleans), environment variables apart."""

    root: Path
    server_name: str = "localhost"
    base_uri: str = ""
    settings: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


class WebServer(Protocol):
    """A running web server with appmanager's module, as the shared suite uses it."""

    port: int

    def request(self, raw: bytes, timeout: float = 60.0) -> Response:
        """Send raw request bytes on a new connection and read one response."""
        ...

    def get(self, path: str = "/", host: str = "localhost", headers: str = "") -> Response:
        """GET ``path`` with this Host on a new connection."""
        ...

    def core(self) -> psutil.Process | None:
        """The core the module started."""
        ...

    def core_socket(self) -> str:
        """The Unix socket the module sends requests to."""
        ...

    def reload(self, mounts: list[Mount]) -> None:
        """Reload with a configuration for ``mounts``; returns when it serves requests."""
        ...

    def stop(self) -> None:
        """Stop the web server and wait until its core and the core's apps have exited."""
        ...

    def logs(self) -> str:
        """The web server's and the core's logs, for assertion messages."""
        ...


class WebServerKind(Protocol):
    """One kind of web server for the shared suite: starts servers for a test (``start``)
    and stops them all at ``close``."""

    name: str

    @staticmethod
    def missing() -> str | None:
        """Why this kind cannot run here (a package is not installed), or None."""
        ...

    def site(self) -> Path:
        """A world-readable directory for apps and document roots, removed at ``close``."""
        ...

    def start(self, mounts: list[Mount]) -> WebServer:
        """A running web server serving ``mounts``."""
        ...

    def close(self) -> None:
        """Stop every server started, and remove their files."""
        ...


def quote(value: str | Path) -> str:
    """A directive argument, double-quoted as nginx and Apache read it."""
    return connectorconf.quote(str(value))


@dataclass
class ServerProcess:
    """One web server under test, in the foreground with its files in ``run_dir``, and the core
    its module started (none with a core socket). Subclasses say how to run it and when it
    serves."""

    run_dir: Path
    conf_path: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    core_pids: set[int] = field(default_factory=set)
    #: The whole configuration for the shared suite's mounts (set by the kind that started it).
    render: Callable[[list[Mount]], str] | None = None

    #: The web server's name in failure messages.
    name: ClassVar[str] = ""

    def command(self) -> list[str]:
        """The command line that runs the web server in the foreground."""
        raise NotImplementedError

    def serves(self) -> bool:
        """Whether the web server, started, now serves requests."""
        raise NotImplementedError

    def reconfigure(self, conf: str | None = None) -> None:
        """Reload with ``conf``; returns when the new configuration serves."""
        raise NotImplementedError

    @property
    def error_log_path(self) -> Path:
        return self.run_dir / "error.log"

    def error_log(self) -> str:
        return _read(self.error_log_path)

    def logs(self) -> str:
        """The web server's error log and standard error, and the core's log when it has its
        own, for assertion messages."""
        core_log = _read(self.run_dir / "core.log")
        return (
            f"--- {self.name} error log ---\n{self.error_log()[-6000:]}\n"
            + (f"--- core log ---\n{core_log[-5000:]}\n" if core_log else "")
            + f"--- {self.name} stderr ---\n{_read(self.run_dir / 'stderr.log')[-2000:]}"
        )

    def request(self, raw: bytes, timeout: float = 60.0) -> Response:
        return request(self.port, raw, timeout=timeout)

    def get(self, path: str = "/", host: str = "localhost", headers: str = "") -> Response:
        raw = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n"
        return self.request(raw.encode())

    def core(self) -> psutil.Process | None:
        """The core started by this web server's module: the master's child with a lifeline."""
        if self.proc is None:
            return None
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return None
        for child in children:
            try:
                if "--lifeline-fd" in child.cmdline():
                    return child
            except psutil.Error:
                continue
        return None

    def core_socket(self) -> str:
        return str(self.run_dir / "instance" / "connector.sock")

    def note_core(self) -> None:
        """Remember the core, to collect its exit status once the web server has gone."""
        core = self.core()
        if core is not None:
            self.core_pids.add(core.pid)

    def start(self, timeout: float = 60.0, env: dict[str, str] | None = None) -> None:
        """Start the web server; returns when it serves (AssertionError if it exits first)."""
        with open(self.run_dir / "stderr.log", "wb") as stderr:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        self.wait_until(self.serves, timeout, "did not start")
        self.note_core()

    def wait_until(self, ready: Callable[[], bool], timeout: float, failure: str) -> None:
        """Poll ``ready`` until it holds; AssertionError naming ``failure``, with the logs, if
        the web server exits first or ``timeout`` passes."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"{self.name} {failure}:\n{self.logs()}")

    def reload(self, mounts: list[Mount]) -> None:
        """The shared suite's reload: the configuration for ``mounts``."""
        assert self.render is not None
        self.reconfigure(self.render(mounts))

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the web server, then wait until its core and the core's apps have exited."""
        if self.proc is None:
            return
        core = self.core()
        watched: list[psutil.Process] = []
        if core is not None:
            self.core_pids.add(core.pid)
            watched = [core, *_descendants(core)]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} did not stop:\n{self.logs()}") from None
        _, alive = psutil.wait_procs(watched, timeout=timeout)
        alive = [p for p in alive if _running(p)]
        if alive:
            for p in alive:
                p.kill()
            raise AssertionError(f"left running after {self.name} stopped: {alive}\n{self.logs()}")
        for pid in self.core_pids:
            _reap(pid)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _reap(pid: int) -> None:
    """A core outlives the web server by a moment and is then re-parented to the test runner
    (a subreaper): collect its exit status."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


S = TypeVar("S", bound=ServerProcess)


class ServerFactory(Generic[S]):
    """Writes configurations and starts web servers of one kind; every server is stopped and
    every directory removed at ``close``."""

    #: The class of its servers, and the name of their configuration file in the run directory.
    server_type: type[S]
    conf_name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.servers: list[S] = []
        self.dirs: list[Path] = []

    def site(self) -> Path:
        """A world-readable directory for apps and document roots; removed at close."""
        return self.new_dir("site")

    def new_dir(self, prefix: str) -> Path:
        """A world-readable temporary directory, removed at close."""
        path = public_dir(prefix)
        self.dirs.append(path)
        return path

    def new_server(self, config: Callable[[Path, int], str], **options: Any) -> S:
        """A server, not started, in a new run directory, on a free port, with the
        configuration ``config(run_dir, port)``; ``options`` go to its class."""
        run_dir = self.new_dir(self.server_type.name.lower())
        port = free_port()
        conf = run_dir / self.conf_name
        conf.write_text(config(run_dir, port))
        server = self.server_type(run_dir, conf, port, **options)
        self.servers.append(server)
        return server

    def close(self) -> None:
        errors = []
        for server in self.servers:
            try:
                server.stop()
            except AssertionError as exc:
                errors.append(str(exc))
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)
        if errors:
            raise AssertionError("\n".join(errors))


F = TypeVar("F", bound="ServerFactory[Any]")


class ServerKind(Generic[F]):
    """A kind of web server for the shared suite (``WebServerKind``) around its factory."""

    name: ClassVar[str] = ""
    factory_type: type[F]

    def __init__(self) -> None:
        self.factory = self.factory_type()

    def site(self) -> Path:
        return self.factory.site()

    def close(self) -> None:
        self.factory.close()


def public_dir(prefix: str) -> Path:
    """A temporary directory every user may traverse and read (pytest's are private)."""
    path = Path(tempfile.mkdtemp(prefix=f"appmanager-{prefix}-", dir="/tmp"))
    path.chmod(0o755)
    return path


def copy_app(source: Path, parent: Path, static: dict[str, str] | None = None) -> Path:
    """A world-readable copy of the app in ``source`` under ``parent``, with a public/
    directory holding ``static`` files (path: text). node_modules is linked, not copied."""
    dest = parent / source.name
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("node_modules", "__pycache__"))
    if (source / "node_modules").is_dir():
        (dest / "node_modules").symlink_to(source / "node_modules")
    public = dest / "public"
    public.mkdir(exist_ok=True)
    for rel, text in (static or {}).items():
        (public / rel).parent.mkdir(parents=True, exist_ok=True)
        (public / rel).write_text(text)
    for root, dirs, files in os.walk(dest):
        for entry in dirs + files:
            path = os.path.join(root, entry)
            if not os.path.islink(path):
                os.chmod(path, 0o755 if os.path.isdir(path) else 0o644)
    dest.chmod(0o755)
    return dest


def app_source(name: str) -> Path:
    """An app of tests/apps, or of the connector tests' own apps/."""
    own = CONNECTOR_APPS / name
    return own if own.is_dir() else APPS / name


def core_connections(core: psutil.Process, socket_path: str) -> set[int]:
    """The connections the core holds open on its connector socket, by socket inode (the
    listening socket excluded): how many the web server keeps alive to it."""
    on_path = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            # Num RefCount Protocol Flags Type St Inode [Path]; St 03: connected
            if len(fields) >= 8 and fields[7] == socket_path and fields[5] == "03":
                on_path.add(int(fields[6]))
    held = set()
    fd_dir = f"/proc/{core.pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inode = int(target[len("socket:[") : -1])
            if inode in on_path:
                held.add(inode)
    return held


def timed_body(port: int, raw: bytes, markers: list[bytes], timeout: float = 30.0) -> list[float]:
    """Send ``raw`` and read the response until every marker has arrived; returns, for each
    marker, the seconds from sending until it had arrived (how incrementally the body came)."""
    seen: dict[bytes, float] = {}
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        start = time.monotonic()
        sock.sendall(raw)
        while len(seen) < len(markers):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            for marker in markers:
                if marker not in seen and marker in data:
                    seen[marker] = time.monotonic() - start
    missing = [m for m in markers if m not in seen]
    assert not missing, f"{missing} never arrived: {data[-2000:]!r}"
    return [seen[m] for m in markers]
