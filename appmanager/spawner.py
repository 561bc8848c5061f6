"""The Spawner: starting one app process through its language's shim (``docs/protocol/spawn.md``).

Direct spawning: each process execs the shim afresh. A spawn lives for the duration of one
``spawn()`` call; what it produces is a Process in the SPAWNING state that has answered READY.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import socket
import sys
from importlib import resources
from typing import TYPE_CHECKING, Any

from appmanager.output import OutputCapture
from appmanager.process import Process
from appmanager.spawnerror import SpawnError

if TYPE_CHECKING:
    from appmanager.group import Group

log = logging.getLogger("appmanager")

PROTOCOL_VERSION = 1
CONTROL_FD = 3
PROGRESS_FD = 4
SHIMS = {"wsgi": ("python", "appmanager_python.py")}


def shim_path(app_type: str) -> str:
    """Where the shim for ``app_type`` is: installed inside the package, or in the source tree's
    top-level ``spawners/`` when appmanager runs from a checkout."""
    package, name = SHIMS[app_type]
    try:
        path = str(resources.files("appmanager.spawners").joinpath(package, name))
        if os.path.isfile(path):
            return path
    except ModuleNotFoundError:
        pass
    source_tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(source_tree, "spawners", package, name)


def _high_dup(fd: int) -> int:
    """A close-on-exec copy of ``fd`` numbered 10 or above, so that placing descriptors at 3 and 4
    in the child can never overwrite a source that happens to be 3 or 4."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


async def spawn(group: Group) -> Process:
    """Start one process of ``group``'s app and wait for its READY. Raises ``SpawnError``."""
    spec = group.spec
    cfg = group.settings
    interpreter = cfg["python"] or sys.executable
    loop = asyncio.get_running_loop()

    core_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    progress_fd = os.memfd_create("appmanager-progress", os.MFD_CLOEXEC)
    os.ftruncate(progress_fd, 8)
    out_r, out_w = os.pipe()
    child_ctl = _high_dup(child_end.fileno())
    child_progress = _high_dup(progress_fd)
    env = _environment(group)
    actions: list[tuple[Any, ...]] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, out_w, 1),
        (os.POSIX_SPAWN_DUP2, out_w, 2),
        (os.POSIX_SPAWN_DUP2, child_ctl, CONTROL_FD),
        (os.POSIX_SPAWN_DUP2, child_progress, PROGRESS_FD),
    ]
    try:
        pid = os.posix_spawn(
            interpreter,
            [interpreter, shim_path(spec.app_type)],
            env,
            file_actions=actions,
            setsid=True,
        )
    except OSError as exc:
        for fd in (out_r, progress_fd):
            os.close(fd)
        core_end.close()
        raise SpawnError("PREPARE", f"cannot run {interpreter}: {exc.strerror}") from None
    finally:
        for fd in (out_w, child_ctl, child_progress):
            os.close(fd)
        child_end.close()

    output = OutputCapture(loop, out_r, group.name)
    output.pid = pid
    pidfd = os.pidfd_open(pid)
    core_end.setblocking(False)
    log.info("process %d spawned for app %s", pid, group.name)
    message = {
        "protocol": PROTOCOL_VERSION,
        "app_root": spec.root,
        "app_type": spec.app_type,
        "startup_file": spec.startup_file,
        "callables": list(spec.callables),
        "environment": cfg["environment"],
        "base_uri": "",
        "app_name": group.name,
    }
    proc = Process(group, pid, core_end, progress_fd, pidfd, output, concurrency=1)
    try:
        core_end.send(b"SPAWN " + json.dumps(message).encode())
        reply = await asyncio.wait_for(_read_reply(loop, core_end), cfg["start_timeout"])
    except TimeoutError:
        proc.abandon()
        raise SpawnError(
            "LOAD_APP",
            f"the app did not finish booting within {cfg['start_timeout']:g} s (start_timeout)",
            output=output.text(),
        ) from None
    except OSError as exc:
        proc.abandon()
        raise SpawnError(
            "PREPARE", f"control channel failed: {exc}", output=output.text()
        ) from None
    if reply is None:
        # Exited before answering; give the pipe a moment so the output is complete.
        await asyncio.sleep(0.05)
        proc.abandon()
        raise SpawnError("PREPARE", "the process exited before it was ready", output=output.text())
    kind, _, payload = reply.partition(b" ")
    info = json.loads(payload or b"{}")
    if kind == b"READY":
        proc.concurrency = int(info.get("concurrency", 1))
        return proc
    proc.abandon()
    if kind == b"ERROR":
        raise SpawnError(
            str(info.get("step", "PREPARE")),
            str(info.get("message", "unknown error")),
            traceback=str(info.get("traceback", "")),
            output=output.text(),
        )
    raise SpawnError("PREPARE", f"unexpected answer {reply[:60]!r}", output=output.text())


async def _read_reply(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes | None:
    """The shim's one answer to SPAWN, or None when the channel closed first."""
    fut: asyncio.Future[bytes | None] = loop.create_future()

    def readable() -> None:
        try:
            data = sock.recv(1024 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not fut.done():
            fut.set_result(data or None)

    loop.add_reader(sock.fileno(), readable)
    try:
        return await fut
    finally:
        loop.remove_reader(sock.fileno())


def _environment(group: Group) -> dict[str, str]:
    env = dict(os.environ)
    app_env = group.settings["environment"]
    for name in ("APPMANAGER_ENV", "WSGI_ENV", "RACK_ENV", "RAILS_ENV", "NODE_ENV"):
        env[name] = app_env
    env["APPMANAGER_CONTROL_FD"] = str(CONTROL_FD)
    env["APPMANAGER_PROGRESS_FD"] = str(PROGRESS_FD)
    env["PYTHONUNBUFFERED"] = "1"
    return env
