"""The Spawner: starting one app process (``docs/protocol/spawn.md``).

Direct spawning: each process execs its language's shim afresh (or, for a generic app, the app's own
command). A spawn lives for one ``spawn()`` call; what it produces is a Process that answered READY,
still in the SPAWNING state until its Group starts it serving.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from appmanager.output import OutputCapture
from appmanager.preloader import Preloader
from appmanager.process import RECV_SIZE_CONNECTIONS, Process
from appmanager.process_node import NodeProcess
from appmanager.proxy import ProxyProcess
from appmanager.slots import ConnectionSlots
from appmanager.spawnerror import SpawnError
from appmanager.users import RunAs, current_user, process_user, run_as

if TYPE_CHECKING:
    from appmanager.group import Group

log = logging.getLogger("appmanager")

PROTOCOL_VERSION = 1
CONTROL_FD = 3
PROGRESS_FD = 4
# Node tracks one byte per connection in its progress file (see handoff.md, "Node").
NODE_SLOTS = 65536
# A Python or Ruby process's progress file: the Q path's seq (8 bytes), then an 8-byte slot for
# each of the whole connections an ASGI or Rack process may hold (handoff.md, "Whole
# connections"); a memfd's pages are only allocated where written.
PROGRESS_SIZE = 8 + 8 * 65536


@dataclass(frozen=True)
class Shim:
    """How to run the shim of one language."""

    directory: str
    filename: str
    interpreter_setting: str
    default_interpreter: str


SHIMS = {
    "python": Shim("python", "appmanager_python.py", "python", sys.executable),
    "ruby": Shim("ruby", "appmanager_ruby.rb", "ruby", "ruby"),
    "node": Shim("node", "appmanager_node.js", "nodejs", "node"),
}


def shim_path(language: str) -> str:
    """Where the shim for ``language`` is: installed inside the package, or in the source tree's
    top-level ``spawners/`` when appmanager runs from a checkout."""
    shim = SHIMS[language]
    try:
        path = str(resources.files("appmanager.spawners").joinpath(shim.directory, shim.filename))
        if os.path.isfile(path):
            return path
    except ModuleNotFoundError:
        pass
    source_tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(source_tree, "spawners", shim.directory, shim.filename)


def interpreter(group: Group, language: str) -> str:
    """The interpreter that runs ``language`` for ``group``, resolved on the PATH."""
    shim = SHIMS[language]
    wanted = group.settings[shim.interpreter_setting] or shim.default_interpreter
    found = shutil.which(wanted)
    if found is None:
        option = "--" + shim.interpreter_setting
        raise SpawnError("PREPARE", f"{wanted} not found (set its path with {option})")
    return found


def _high_dup(fd: int) -> int:
    """A close-on-exec copy of ``fd`` numbered 10 or above, so that placing descriptors at 3 and 4
    in the child can never overwrite a source that happens to be 3 or 4."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


def _environment(group: Group, extra: dict[str, str], user: RunAs | None) -> dict[str, str]:
    env = dict(os.environ)
    if user is not None:
        env.update(user.environment())
    app_env = group.settings["environment"]
    for name in ("APPMANAGER_ENV", "WSGI_ENV", "RACK_ENV", "RAILS_ENV", "NODE_ENV"):
        env[name] = app_env
    env["PYTHONUNBUFFERED"] = "1"
    env.update(group.settings["env_var"] or {})
    env.update(extra)
    return env


def _launch(
    argv: list[str], env: dict[str, str], fds: dict[int, int], group: Group, user: RunAs | None
) -> tuple[int, OutputCapture]:
    """Start ``argv`` in its own session with stdin from /dev/null, stdout and stderr into the log,
    ``fds`` (target number → source descriptor) in place, and as ``user`` (None: as the core's
    own user)."""
    out_r, out_w = os.pipe()
    high = {target: _high_dup(source) for target, source in fds.items()}
    try:
        if user is None:
            pid = _posix_spawn(argv, env, high, out_w)
        else:
            pid = _spawn_as(user, argv, env, high, out_w, group.spec.root)
    except SpawnError:
        os.close(out_r)
        raise
    finally:
        os.close(out_w)
        for fd in high.values():
            os.close(fd)
    output = OutputCapture(asyncio.get_running_loop(), out_r, group.name)
    output.pid = pid
    name = current_user() if user is None else user.name
    log.info("process %d spawned for app %s as user %s", pid, group.name, name)
    return pid, output


def _posix_spawn(argv: list[str], env: dict[str, str], fds: dict[int, int], out_w: int) -> int:
    """The fast path, when no user switching is needed: posix_spawn (vfork and exec)."""
    actions: list[tuple[Any, ...]] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, out_w, 1),
        (os.POSIX_SPAWN_DUP2, out_w, 2),
    ]
    actions += [(os.POSIX_SPAWN_DUP2, source, target) for target, source in fds.items()]
    try:
        return os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)
    except OSError as exc:
        raise SpawnError("PREPARE", f"cannot run {argv[0]}: {exc.strerror}") from None


# Switching users. posix_spawn cannot change the user (Python 3.11 has no such attribute), and
# os.fork() followed by Python code in the child is unsafe in the core (other threads: ZeroMQ's,
# the loop's executor) and slow (the whole interpreter runs in the child); preexec_fn has the same
# problem. subprocess.Popen does the switch in C between fork and exec (_posixsubprocess:
# setgroups, setregid, setreuid, then exec), so nothing of the app, not even its environment
# (LD_PRELOAD, PYTHONPATH), is ever used as root. What Popen cannot do is put descriptors at chosen
# numbers (pass_fds keeps them where they are), and the shims expect theirs at exactly 3 and 4; so
# the child is _PLACE_FDS, a line of bash already running as the app's user, which moves the
# descriptors onto their numbers and execs the real program. Dup'ing onto 3 and 4 in the core
# around Popen instead would race with everything else the core opens meanwhile. The cost is one
# short-lived shell, only for processes that switch users; forked processes come from their
# preloader, which already runs as the app's user.
# bash is on every Debian machine (an Essential package) and runnable by every user, whatever the
# app's language (the core's own interpreter may live where the app's user cannot reach it);
# unlike dash it takes descriptor numbers above 9, and the sources are 10 or above. $1 is
# "TARGET:SOURCE,...".
_PLACE_FDS = (
    'IFS=","; for pair in $1; do t=${pair%%:*}; s=${pair#*:}; eval "exec $t<&$s $s<&-"; done; '
    'shift; exec "$@"'
)


def _spawn_as(
    user: RunAs,
    argv: list[str],
    env: dict[str, str],
    fds: dict[int, int],
    out_w: int,
    cwd: str,
) -> int:
    """Start ``argv`` as ``user`` (see above): in the app root, with ``fds`` placed by _PLACE_FDS
    when there are any."""
    if fds:
        placement = ",".join(f"{target}:{source}" for target, source in fds.items())
        argv = ["/bin/bash", "-c", _PLACE_FDS, "bash", placement, *argv]
    try:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=out_w,
            pass_fds=tuple(fds.values()),
            cwd=cwd,
            env=env,
            start_new_session=True,
            # As posix_spawn: signal dispositions are inherited (SIGPIPE stays ignored).
            restore_signals=False,
            user=user.uid,
            group=user.gid,
            extra_groups=list(user.groups),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        where = getattr(exc, "filename", None)
        if where and where != argv[0]:
            reason = f"{where}: {reason}"
        raise SpawnError("PREPARE", f"cannot run {argv[0]} as user {user.name}: {reason}") from None
    # The process is the core's to reap (its pidfd, like any other): a Popen whose returncode is
    # unset would waitpid() it from __del__ or subprocess's cleanup of other Popens, and take its
    # exit status away. Marking it done leaves the Popen inert.
    child.returncode = 0
    return child.pid


def _spawn_message(group: Group) -> dict[str, Any]:
    spec = group.spec
    return {
        "protocol": PROTOCOL_VERSION,
        "app_root": spec.root,
        "app_type": spec.app_type,
        "startup_file": spec.startup_file,
        "callables": list(spec.callables),
        "environment": group.settings["environment"],
        "base_uri": group.base_uri,
        "app_name": group.name,
        # Processes that take whole connections (Node, ASGI) report each response for the access
        # log only when it is on, and count requests in steps that suit max_requests.
        "access_log": group.pool.access_log is not None,
        "max_requests": group.settings["max_requests"],
    }


async def spawn(group: Group) -> Process:
    """Start one process of ``group``'s app and wait for its READY. Raises ``SpawnError``."""
    language = group.spec.language
    if language == "generic":
        return await _spawn_generic(group)
    if language == "node":
        return await _spawn_node(group)
    if group.smart:
        return await _spawn_forked(group, await group.get_preloader())
    return await _spawn_shim(group, language)


def _channel(kind: int, progress_size: int) -> tuple[socket.socket, socket.socket, int]:
    """A new process's control socketpair (the core's end, the child's end) and its progress
    file of ``progress_size`` bytes."""
    core_end, child_end = socket.socketpair(socket.AF_UNIX, kind)
    progress_fd = os.memfd_create("appmanager-progress", os.MFD_CLOEXEC)
    os.ftruncate(progress_fd, progress_size)
    return core_end, child_end, progress_fd


def _launch_with_channel(
    group: Group, argv: list[str], kind: int, progress_size: int, extra_env: dict[str, str]
) -> tuple[int, OutputCapture, socket.socket, int]:
    """Run ``argv`` (a shim) with its control channel at fd 3 and its progress file at fd 4.
    Returns the pid, its output capture, the core's end of the channel (non-blocking) and the
    progress file."""
    user = run_as(group)
    core_end, child_end, progress_fd = _channel(kind, progress_size)
    env = _environment(group, extra_env, user)
    try:
        pid, output = _launch(
            argv, env, {CONTROL_FD: child_end.fileno(), PROGRESS_FD: progress_fd}, group, user
        )
    except SpawnError:
        core_end.close()
        os.close(progress_fd)
        raise
    finally:
        child_end.close()
    core_end.setblocking(False)
    return pid, output, core_end, progress_fd


async def _start_shim(
    group: Group, language: str, message: dict[str, Any]
) -> tuple[Process, bytes]:
    """Exec a Python or Ruby shim with a SOCK_SEQPACKET control channel, send it ``message`` and
    wait for its one answer. Returns the process (still SPAWNING) and the answer."""
    argv = [interpreter(group, language), shim_path(language)]
    env = {"APPMANAGER_CONTROL_FD": str(CONTROL_FD), "APPMANAGER_PROGRESS_FD": str(PROGRESS_FD)}
    pid, output, core_end, progress_fd = _launch_with_channel(
        group, argv, socket.SOCK_SEQPACKET, PROGRESS_SIZE, env
    )
    proc = Process(group, pid, core_end, progress_fd, os.pidfd_open(pid), output, 1)
    data = b"SPAWN " + json.dumps(message).encode()
    reply = await _handshake(group, proc, lambda: core_end.send(data), _datagram_reply)
    return proc, reply


async def _spawn_shim(group: Group, language: str) -> Process:
    """Python and Ruby, direct: a fresh shim that loads the app and serves."""
    proc, reply = await _start_shim(group, language, _spawn_message(group))
    kind, _, payload = reply.partition(b" ")
    return _finish(group, proc, kind.decode(), json.loads(payload or b"{}"))


async def start_preloader(group: Group) -> Preloader:
    """Python and Ruby, smart: a shim that loads the app once and forks processes on command."""
    message = {**_spawn_message(group), "spawn_method": "smart", "core_pid": os.getpid()}
    proc, reply = await _start_shim(group, group.spec.language, message)
    kind, _, payload = reply.partition(b" ")
    info = json.loads(payload or b"{}")
    if kind != b"PRELOADER":
        _finish(group, proc, kind.decode(), info)  # raises the ERROR
        proc.abandon()
        raise SpawnError("PREPARE", f"the preloader answered {kind.decode()!r}")
    reported = info.get("app_type")
    if isinstance(reported, str) and reported:
        group.app_type = reported
    os.close(proc.progress_fd)  # the preloader serves no requests
    preloader = Preloader(group, proc.pid, proc.ctl, proc.pidfd, proc.output)
    preloader.start()
    return preloader


async def _spawn_forked(group: Group, preloader: Preloader) -> Process:
    """One more process forked from the app's preloader, with an output pipe of its own."""
    core_end, child_end, progress_fd = _channel(socket.SOCK_SEQPACKET, PROGRESS_SIZE)
    out_r, out_w = os.pipe()
    started = time.monotonic()
    try:
        pid = await preloader.fork(
            child_end.fileno(), progress_fd, out_w, group.settings["start_timeout"]
        )
    except SpawnError:
        core_end.close()
        os.close(progress_fd)
        os.close(out_r)
        raise
    finally:
        child_end.close()
        os.close(out_w)
    core_end.setblocking(False)
    output = OutputCapture(asyncio.get_running_loop(), out_r, group.name)
    output.pid = pid
    proc = Process(group, pid, core_end, progress_fd, os.pidfd_open(pid), output, 1)
    proc.preloader = preloader
    reply = await _handshake(group, proc, lambda: None, _datagram_reply)
    kind, _, payload = reply.partition(b" ")
    result = _finish(group, proc, kind.decode(), json.loads(payload or b"{}"))
    log.info(
        "process %d forked by preloader %d in %.0f ms as user %s",
        pid,
        preloader.pid,
        (time.monotonic() - started) * 1000,
        process_user(pid),
    )
    return result


async def _spawn_node(group: Group) -> Process:
    """Node: its own IPC channel (JSON lines over SOCK_STREAM) and whole connections."""
    argv = [interpreter(group, "node"), shim_path("node")]
    env = {
        "NODE_CHANNEL_FD": str(CONTROL_FD),
        "NODE_CHANNEL_SERIALIZATION_MODE": "json",
        "APPMANAGER_PROGRESS_FD": str(PROGRESS_FD),
    }
    pid, output, core_end, progress_fd = _launch_with_channel(
        group, argv, socket.SOCK_STREAM, NODE_SLOTS, env
    )
    proc = NodeProcess(group, pid, core_end, progress_fd, os.pidfd_open(pid), output)
    message = {"cmd": "APPMANAGER_SPAWN", **_spawn_message(group)}
    line = json.dumps(message).encode() + b"\n"
    reply = await _handshake(group, proc, lambda: core_end.sendall(line), proc.read_line)
    info = json.loads(reply)
    kind = {"APPMANAGER_READY": "READY", "APPMANAGER_ERROR": "ERROR"}.get(info.get("cmd"), "")
    return _finish(group, proc, kind, info)


async def _spawn_generic(group: Group) -> Process:
    """A generic app: the app's own command, listening on $PORT; READY once the port accepts."""
    port = _free_port()
    user = run_as(group)
    env = _environment(group, {"PORT": str(port), "APPMANAGER_APP_ROOT": group.spec.root}, user)
    argv = [sys.executable, "-c", _GENERIC_LAUNCHER, group.spec.command]
    pid, output = _launch(argv, env, {}, group, user)
    proc = ProxyProcess(group, pid, os.pidfd_open(pid), output, port)
    deadline = time.monotonic() + group.settings["start_timeout"]
    while True:
        if proc.exited():
            await asyncio.sleep(0.05)
            proc.abandon()
            raise SpawnError(
                "LISTEN",
                f"the command exited before it listened on port {port}",
                output=output.text(),
            )
        if await proc.port_open():
            return proc
        if time.monotonic() > deadline:
            proc.abandon()
            raise SpawnError(
                "LISTEN",
                f"the app did not listen on port {port} within "
                f"{group.settings['start_timeout']:g} s (start_timeout)",
                output=output.text(),
            )
        await asyncio.sleep(0.05)


# Runs a generic app's command so that it dies with the core: the death signal set here survives
# exec, which a program that knows nothing of appmanager could not arrange itself. It also moves to
# the app root (posix_spawn in Python 3.11 has no chdir action).
_GENERIC_LAUNCHER = """
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() == 1:
    sys.exit(1)
os.chdir(os.environ["APPMANAGER_APP_ROOT"])
os.execv("/bin/sh", ["/bin/sh", "-c", "exec " + sys.argv[1]])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _handshake(group: Group, proc: Process, send: Any, read: Any) -> bytes:
    """Send the spawn message and wait for the one answer; abandon the process on failure."""
    try:
        send()
        reply: bytes | None = await asyncio.wait_for(
            read(asyncio.get_running_loop(), proc.ctl), group.settings["start_timeout"]
        )
    except TimeoutError:
        proc.abandon()
        raise SpawnError(
            "LOAD_APP",
            f"the app did not finish booting within {group.settings['start_timeout']:g} s "
            "(start_timeout)",
            output=proc.output.text(),
        ) from None
    except OSError as exc:
        proc.abandon()
        raise SpawnError(
            "PREPARE", f"control channel failed: {exc}", output=proc.output.text()
        ) from None
    if reply is None:
        # Exited before answering; give the pipe a moment so the output is complete.
        await asyncio.sleep(0.05)
        proc.abandon()
        raise SpawnError(
            "PREPARE", "the process exited before it was ready", output=proc.output.text()
        )
    return reply


def _finish(group: Group, proc: Process, kind: str, info: dict[str, Any]) -> Process:
    if kind == "READY":
        proc.concurrency = int(info.get("concurrency", 1))
        if info.get("connections") is True and proc.concurrency <= 1 and proc.slots is None:
            # An ASGI process (concurrency 0) or a Rack one (1, one request at a time across its
            # connections): whole connections too, with 8-byte slots after the seq.
            proc.takes_connections = True
            proc.slots = ConnectionSlots(proc.progress_fd, 8, 8)
            proc.recv_size = RECV_SIZE_CONNECTIONS
        reported = info.get("app_type")
        if isinstance(reported, str) and reported:
            group.app_type = reported
        return proc
    proc.abandon()
    if kind == "ERROR":
        raise SpawnError(
            str(info.get("step", "PREPARE")),
            str(info.get("message", "unknown error")),
            traceback=str(info.get("traceback", "")),
            output=proc.output.text(),
        )
    raise SpawnError("PREPARE", f"unexpected answer {info!r:.80}", output=proc.output.text())


async def _datagram_reply(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes | None:
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
