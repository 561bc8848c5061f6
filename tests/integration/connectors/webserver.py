"""What the connector tests share, whichever web server runs them.

The shared suite (``test_connector_suite.py``) describes the apps to serve as ``Mount``s and runs
against every kind of web server in its ``WEB_SERVERS`` list: each kind renders its own
configuration from the mounts, starts the real web server with appmanager's module, and stops
it (with the core and the apps) at the end. As root, the web server's workers run as another
user, so apps and document roots live in world-readable temporary directories.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil
from conftest import APPS, Response

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
