"""The Preloader: one app loaded once, forking its processes on command (smart spawning).

See "Smart spawning" in ``docs/protocol/spawn.md``. A Group with smart spawning owns at most one
Preloader. It is started when the group first needs a process, and stopped after
``max_preloader_idle_time`` seconds without a fork (or when the core stops); the processes it forked
outlive it, because the core is a child subreaper and inherits them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from appmanager.output import OutputCapture
from appmanager.spawnerror import SpawnError

if TYPE_CHECKING:
    from appmanager.group import Group

log = logging.getLogger("appmanager")

STOP_GRACE = 5.0


class Preloader:
    """The preloader process of one app, and the core's side of its channel."""

    def __init__(
        self, group: Group, pid: int, ctl: socket.socket, pidfd: int, output: OutputCapture
    ) -> None:
        self.group = group
        self.pid = pid
        self.ctl = ctl
        self.pidfd = pidfd
        self.output = output
        self.app_type = group.spec.app_type
        self.last_fork = time.monotonic()
        self.alive = True
        self._seq = 0
        self._forks: dict[int, asyncio.Future[int]] = {}
        self._loop = asyncio.get_running_loop()
        self._kill_timer: asyncio.TimerHandle | None = None
        # Exit statuses of forked processes, reported by the preloader (their parent).
        self.exit_statuses: dict[int, int] = {}

    def start(self) -> None:
        """The preloader answered PRELOADER: listen for its messages and its exit."""
        self._loop.add_reader(self.ctl.fileno(), self._on_control)
        self._loop.add_reader(self.pidfd, self._on_exit)
        log.info("preloader %d of app %s is ready", self.pid, self.group.name)

    async def fork(self, ctl_fd: int, progress_fd: int, output_fd: int, timeout: float) -> int:
        """Ask for one more process, with its control channel, progress file and output pipe;
        return its pid."""
        if not self.alive:
            raise SpawnError("PREPARE", "the preloader is gone")
        self._seq += 1
        seq = self._seq
        fut: asyncio.Future[int] = self._loop.create_future()
        self._forks[seq] = fut
        message = b"FORK " + json.dumps({"seq": seq}).encode()
        fds = struct.pack("iii", ctl_fd, progress_fd, output_fd)
        self.last_fork = time.monotonic()
        try:
            self.ctl.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise SpawnError(
                "PREPARE", f"the preloader did not fork within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise SpawnError("PREPARE", f"the preloader's channel failed: {exc}") from None
        finally:
            self._forks.pop(seq, None)

    def _on_control(self) -> None:
        try:
            msg = self.ctl.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            msg = b""
        if not msg:
            self._gone("its channel closed")
            return
        kind, _, payload = msg.partition(b" ")
        try:
            info: dict[str, Any] = json.loads(payload or b"{}")
        except ValueError:
            log.error("preloader %d sent an unreadable message %r", self.pid, msg[:80])
            return
        if kind == b"FORKED":
            fut = self._forks.get(int(info.get("seq", -1)))
            if fut is not None and not fut.done():
                fut.set_result(int(info["pid"]))
        elif kind == b"EXITED":
            self.exit_statuses[int(info.get("pid", 0))] = int(info.get("status", 0))
        else:
            log.error("preloader %d sent an unknown message %r", self.pid, msg[:80])

    def stop(self, reason: str) -> None:
        """Close the channel (the preloader exits); its processes keep running."""
        if not self.alive:
            return
        log.info("preloader %d of app %s stopping: %s", self.pid, self.group.name, reason)
        self._close()
        self._kill_timer = self._loop.call_later(STOP_GRACE, self._kill)

    def _close(self) -> None:
        self.alive = False
        if self.ctl.fileno() >= 0:
            self._loop.remove_reader(self.ctl.fileno())
            self.ctl.close()
        for fut in self._forks.values():
            if not fut.done():
                fut.set_exception(SpawnError("PREPARE", "the preloader exited"))

    def _kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _gone(self, why: str) -> None:
        if self.alive:
            log.warning("preloader %d of app %s is gone: %s", self.pid, self.group.name, why)
            self._close()
        self.group.on_preloader_gone(self)

    def _on_exit(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0
        if pid == 0:
            return
        self._loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        code = os.waitstatus_to_exitcode(status)
        log.info("preloader %d exited with status %d", self.pid, code)
        self._gone("it exited")
