"""Smart spawning in the Python shim: the preloader, and the first steps of a process it forks.

With ``"spawn_method": "smart"`` in SPAWN (docs/protocol/spawn.md, "Smart spawning"), the shim
loads the app once, answers PRELOADER, and then forks an app process on each ``FORK`` command
from the core. A forked process starts with the loaded app in memory, shared copy-on-write with
the preloader; it takes the control channel and progress file that came with its FORK, and from
then on ``appmanager_python.py`` runs it like a process spawned directly.

The preloader reports each process it forked when it exits (``EXITED``). Its own life ends with
EOF on its channel or SIGTERM; the processes it forked outlive it (the core is their subreaper)
and watch their parent instead of relying on PR_SET_PDEATHSIG, see ``watch_parent``.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Run as a script, the shim imports its modules from its own directory; mypy, run from the
    # repository root, knows them by their package path.
    from spawners.python import appmanager_python_handoff as handoff
else:
    import appmanager_python_handoff as handoff

PR_SET_PDEATHSIG = 1
# The name an app module gives the function each forked process calls before it serves.
AFTER_FORK_HOOK = "appmanager_after_fork"
# FORK {"seq": N} and a little room; anything longer is not a FORK command.
MAX_COMMAND = 4096
# How often a forked process checks that its parent is the preloader or the core (spawn.md asks
# for at least once a second).
WATCHDOG_INTERVAL = 0.5

ProtocolError = handoff.ProtocolError
log = handoff.log


def set_parent_death_signal(signum: int) -> bool:
    """PR_SET_PDEATHSIG: the signal this process gets when its parent dies, 0 for none.

    False when the system has no such thing (anything but Linux).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class ForkedChannels:
    """What a forked process serves on: the descriptors that came with its FORK, now at the
    numbers the preloader's own channel and progress file had (3 and 4)."""

    control: socket.socket
    progress_fd: int


def _enqueue(signum: int, frame: FrameType | None) -> None:
    """The preloader's signal handler does nothing itself: set_wakeup_fd has written the signal's
    number to the wakeup pipe, and the loop dispatches it."""


class Preloader:
    """Forks app processes on the core's command, reaps them and reports their exits.

    Created once the app is loaded, before PRELOADER goes out; lives in the shim's main thread
    until EOF on its channel or SIGTERM, and in a forked process ends the moment ``fork`` returns
    there. It never starts a thread, so that each fork copies a process with one thread in it.

    Invariants: ``children`` holds the pids this preloader forked and has not reaped; a pid gets
    its FORKED before its EXITED (the loop reaps only between commands); the descriptors that
    come with a FORK are closed in the preloader before the next command is read.
    """

    # The signals the loop handles, each by the method named here (gunicorn's arbiter's way).
    SIGNALS: dict[int, str] = {signal.SIGCHLD: "handle_sigchld", signal.SIGTERM: "handle_sigterm"}

    def __init__(
        self, control: socket.socket, control_fd: int, progress_fd: int, core_pid: int
    ) -> None:
        self.control = control
        self.control_fd = control_fd
        self.progress_fd = progress_fd
        self.pid = os.getpid()
        self.core_pid = core_pid
        self.children: set[int] = set()
        self.stopping = False
        self.warned_about_threads = False
        # Signals wake the loop through this pipe: the blocking poll returns when a byte arrives.
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # A full pipe only loses duplicate wake-ups: every wake-up reaps all that exited.
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        for signum in self.SIGNALS:
            signal.signal(signum, _enqueue)

    def serve(self) -> ForkedChannels | None:
        """Serves commands until EOF on the channel or SIGTERM, then returns None; in a process
        forked meanwhile, returns that process's channels instead."""
        poller = select.poll()
        poller.register(self.control_fd, select.POLLIN)
        poller.register(self.wakeup_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self.wakeup_r in ready:
                self.dispatch_signals()
            self.reap()
            if self.stopping:
                return None
            if self.control_fd in ready:
                forked = self.take_command()
                if forked is not None:
                    return forked
                if self.stopping:
                    return None

    def dispatch_signals(self) -> None:
        """Runs ``handle_<signal>`` once for each kind of signal that came since the last time."""
        received = bytearray()
        while True:
            try:
                chunk = os.read(self.wakeup_r, 256)
            except BlockingIOError:
                break
            if not chunk:
                break
            received += chunk
        for signum in sorted(set(received)):
            name = self.SIGNALS.get(signum)
            if name is not None:
                getattr(self, name)()

    def handle_sigchld(self) -> None:
        """Nothing beyond the reaping every wake-up ends with."""

    def handle_sigterm(self) -> None:
        """Stops like EOF does: the processes forked keep serving."""
        self.stopping = True

    def reap(self) -> None:
        """Reaps every child that exited and reports those it forked with EXITED."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if pid not in self.children:
                # A subprocess the app started while it loaded: nobody else would reap it.
                log(f"reaped process {pid} (exit status {code}), which the preloader did not fork")
                continue
            self.children.discard(pid)
            self.send("EXITED", {"pid": pid, "status": code})

    def take_command(self) -> ForkedChannels | None:
        """Reads one command from the core and carries it out; see ``serve`` for what it
        returns."""
        try:
            message, ancdata, msg_flags, _ = self.control.recvmsg(
                MAX_COMMAND, handoff.ANCILLARY_SIZE, handoff.RECV_FLAGS
            )
        except OSError as exc:
            log(f"preloader channel failed: {exc}")
            self.stopping = True
            return None
        fds = handoff.received_fds(ancdata)
        if not message:
            for fd in fds:
                os.close(fd)
            self.stopping = True
            return None
        seq = None
        try:
            tag, _, payload = message.partition(b" ")
            if tag != b"FORK":
                raise ProtocolError(f"expected a FORK command, got {message[:40]!r}")
            seq = fork_seq(payload)
            if msg_flags & handoff.TRUNCATED or len(fds) not in (2, 3):
                raise ProtocolError(f"FORK {seq} came with {len(fds)} descriptors, not 2 or 3")
        except ProtocolError as exc:
            for fd in fds:
                os.close(fd)
            self.refuse(seq, exc)
            return None
        output_fd = fds[2] if len(fds) == 3 else -1
        return self.fork(seq, fds[0], fds[1], output_fd)

    def fork(
        self, seq: int, control_fd: int, progress_fd: int, output_fd: int = -1
    ) -> ForkedChannels | None:
        """Forks a process that will serve on ``control_fd`` and ``progress_fd`` (and write its
        stdout and stderr to ``output_fd`` when given); in the preloader answers FORKED and
        returns None, in the child returns its channels."""
        self.before_fork()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(control_fd)
            os.close(progress_fd)
            if output_fd >= 0:
                os.close(output_fd)
            self.refuse(seq, exc)
            return None
        if pid == 0:
            try:
                if output_fd >= 0:
                    # The process's own output pipe: the core logs its lines with its pid.
                    os.dup2(output_fd, 1)
                    os.dup2(output_fd, 2)
                    os.close(output_fd)
                return self.become_forked_process(control_fd, progress_fd)
            except BaseException:
                # Nothing of the preloader's may run on in this process.
                traceback.print_exc()
                os._exit(1)
        os.close(control_fd)
        os.close(progress_fd)
        if output_fd >= 0:
            os.close(output_fd)
        try:
            # The child does the same: the core signals a process's group, so the child must
            # lead one by the time the core hears of it, whichever of the two runs first.
            os.setpgid(pid, pid)
        except OSError:
            pass  # it exited already: the reaping reports it
        self.children.add(pid)
        self.send("FORKED", {"seq": seq, "pid": pid})
        return None

    def before_fork(self) -> None:
        """Readies the preloader's memory and output for a fork."""
        # Buffered output would be written twice, once by each process.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        # The objects loaded so far move to the GC's permanent generation, which it never scans:
        # a collection in the child would otherwise write to every object it looks at and turn
        # the shared pages into private copies.
        gc.freeze()
        if not self.warned_about_threads:
            threads = thread_count()
            if threads > 1:
                self.warned_about_threads = True
                log(
                    f"the app started {threads - 1} thread(s) while it loaded; forked processes "
                    "have none of them, and a lock one of them held stays locked there"
                )

    def become_forked_process(self, control_fd: int, progress_fd: int) -> ForkedChannels:
        """The first steps of a forked process, before the app's own after-fork hook: it drops
        what belongs to the preloader and takes its own channels."""
        # The preloader's signal handling and wakeup pipe are not this process's; the pipe goes
        # first, or a signal now would wake the preloader.
        signal.set_wakeup_fd(-1)
        for signum in self.SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        os.setpgid(0, 0)
        # fork cleared PR_SET_PDEATHSIG already; said here because a forked process depends on it:
        # its parent, the preloader, may stop long before the core does.
        set_parent_death_signal(0)
        # dup2 closes the preloader's channel and progress file, and puts this process's own at
        # their numbers, close-on-exec. The old socket object lets go of a number that now
        # belongs to the new channel.
        os.dup2(control_fd, self.control_fd, inheritable=False)
        os.dup2(progress_fd, self.progress_fd, inheritable=False)
        os.close(control_fd)
        os.close(progress_fd)
        self.control.detach()
        control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=self.control_fd)
        watch_parent(frozenset((self.pid, self.core_pid)))
        return ForkedChannels(control, self.progress_fd)

    def refuse(self, seq: int | None, exc: BaseException) -> None:
        """Logs a FORK that could not be carried out and goes on. The protocol has no answer for
        it: the core sees no FORKED, and the new channel close without a READY."""
        what = "a FORK command" if seq is None else f"FORK {seq}"
        log(f"ignoring {what}: {type(exc).__name__}: {exc}")

    def send(self, tag: str, payload: dict[str, Any]) -> None:
        """Sends one message to the core; when the channel is gone, stops."""
        try:
            self.control.send(tag.encode() + b" " + json.dumps(payload).encode())
        except OSError as exc:
            log(f"preloader channel failed: {exc}")
            self.stopping = True


def fork_seq(payload: bytes) -> int:
    """The seq of a ``FORK {json}`` command; raises ProtocolError."""
    try:
        data = json.loads(payload)
        seq = data["seq"]
    except (ValueError, TypeError, KeyError):
        raise ProtocolError(f"FORK without a seq: {payload[:80]!r}") from None
    if type(seq) is not int:
        raise ProtocolError(f"FORK seq is not a number: {seq!r}")
    return seq


def thread_count() -> int:
    """How many threads this process runs, C threads included where the system tells."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        threading = sys.modules.get("threading")
        return int(threading.active_count()) if threading is not None else 1


def watch_parent(allowed: frozenset[int]) -> None:
    """Ends this forked process when its parent is neither the preloader nor the core: then
    the core died, and a process of a dead core would serve nobody (spawn.md, step 7).

    A thread in the process rather than PR_SET_PDEATHSIG, which would fire when the preloader
    stops and the process is re-parented to the core, its subreaper.
    """
    if os.getppid() not in allowed:
        os._exit(1)
    import threading

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_INTERVAL)
            if os.getppid() not in allowed:
                try:
                    log("the core is gone; exiting")
                except (OSError, ValueError):
                    pass
                os._exit(1)

    threading.Thread(target=watch, name="appmanager-parent-watchdog", daemon=True).start()


def run_after_fork_hook(module: ModuleType) -> None:
    """Calls the app module's ``appmanager_after_fork()``, if it defines one. The hooks
    registered with ``os.register_at_fork(after_in_child=...)`` have run already, in os.fork."""
    hook = getattr(module, AFTER_FORK_HOOK, None)
    if hook is None:
        return
    if not callable(hook):
        raise TypeError(f"{AFTER_FORK_HOOK} in {module.__name__} is a {type(hook).__name__}")
    hook()
