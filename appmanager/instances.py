"""Finding the running cores of the current user.

Each core registers its instance directory in a per-user registry directory (a symlink named after
its pid) while it runs, so that ``appmanager status`` finds it whatever ``--instance-dir`` said.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class Instance:
    """A running core: its pid and instance directory."""

    pid: int
    directory: str
    url: str
    apps: tuple[str, ...]


def registry_dir() -> str:
    """The per-user registry: under $XDG_RUNTIME_DIR when there is one, else in the temp dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK):
        return os.path.join(runtime, "appmanager")
    return os.path.join(tempfile.gettempdir(), f"appmanager-{os.getuid()}")


def register(directory: str) -> None:
    path = registry_dir()
    os.makedirs(path, mode=0o700, exist_ok=True)
    link = os.path.join(path, str(os.getpid()))
    try:
        os.unlink(link)
    except FileNotFoundError:
        pass
    os.symlink(directory, link)


def unregister() -> None:
    try:
        os.unlink(os.path.join(registry_dir(), str(os.getpid())))
    except OSError:
        pass


def read(directory: str) -> Instance | None:
    """The instance whose directory this is, when its core is alive."""
    try:
        with open(os.path.join(directory, "core.json")) as f:
            state = json.load(f)
        pid = int(state["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError):
        return None
    return Instance(pid, directory, str(state.get("url", "")), tuple(state.get("apps", ())))


def running() -> list[Instance]:
    """Every live core of this user, oldest first; stale registry entries are removed."""
    path = registry_dir()
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    found = []
    for name in sorted(names, key=lambda n: int(n) if n.isdigit() else 0):
        link = os.path.join(path, name)
        instance = read(os.path.realpath(link))
        if instance is None or str(instance.pid) != name:
            try:
                os.unlink(link)
            except OSError:
                pass
            continue
        found.append(instance)
    return found
