"""The Reaper: the rules that end app processes, checked about once a second by the core.

- ``pool_idle_time``: an idle process is stopped, never below ``min_instances``;
- ``memory_limit``: a process whose private memory (USS) is over the limit is retired after its
  current request;
- ``max_request_time``: a process stuck in one request too long is killed; the client gets 504;
- ``max_preloader_idle_time``: a preloader that has not forked for that long is stopped.

(``max_requests`` is counted where requests end, in the Group.) Each decision is logged as one fixed
line naming the process, the rule and the figures.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import psutil

from appmanager.states import ProcessState

if TYPE_CHECKING:
    from appmanager.group import Group
    from appmanager.pool import Pool
    from appmanager.process import Process

log = logging.getLogger("appmanager")

MEMORY_CHECK_INTERVAL = 2.0
# restart.txt is looked at this often (a stat per app): "touch it and within seconds".
RESTART_FILE_INTERVAL = 1.0
MB = 1024 * 1024


class Reaper:
    """Applies the lifetime rules to every group of a Pool; lives as long as the core."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._next_memory_check = 0.0
        self._next_file_check = 0.0

    def sweep(self) -> None:
        now = time.monotonic()
        check_memory = now >= self._next_memory_check
        if check_memory:
            self._next_memory_check = now + MEMORY_CHECK_INTERVAL
        check_files = now >= self._next_file_check
        if check_files:
            self._next_file_check = now + RESTART_FILE_INTERVAL
        for group in self.pool.groups:
            if check_files:
                group.check_restart_files()
            self._request_time(group, now)
            self._idle(group, now)
            if check_memory:
                self._memory(group)
            self._preloader(group, now)

    def _request_time(self, group: Group, now: float) -> None:
        limit = group.settings["max_request_time"]
        if not limit:
            return
        for proc in list(group.processes):
            if proc.state not in (ProcessState.READY, ProcessState.STOPPING) or proc.timed_out:
                continue
            # Requests on whole connections are timed from their slots, except Node's, whose
            # slots do not say when a request began.
            oldest = proc.oldest_request(now)
            if now - oldest > limit:
                log.warning(
                    "process %d killed: a request took longer than %g s (max_request_time)",
                    proc.pid,
                    limit,
                )
                proc.kill_for_timeout()

    def _idle(self, group: Group, now: float) -> None:
        limit = group.settings["pool_idle_time"]
        if not limit:
            return
        keep = group.settings["min_instances"]
        ready = [p for p in group.processes if p.state is ProcessState.READY]
        # Stop the longest idle first, and never below min_instances.
        for proc in sorted(ready, key=lambda p: p.last_used):
            if len(ready) <= keep:
                return
            idle = now - proc.last_used
            if proc.sessions or idle < limit:
                continue
            proc.retire(f"idle for {idle:.0f} s (pool_idle_time)")
            ready.remove(proc)

    def _memory(self, group: Group) -> None:
        limit = group.settings["memory_limit"]
        if not limit:
            return
        for proc in list(group.processes):
            if proc.state is not ProcessState.READY:
                continue
            used = private_memory(proc)
            if used is not None and used > limit * MB:
                proc.retire(
                    f"private memory {used / MB:.0f} MB is over the limit of {limit} MB "
                    "(memory_limit)"
                )
                group.replace_soon()

    def _preloader(self, group: Group, now: float) -> None:
        preloader = group.preloader
        limit = group.settings["max_preloader_idle_time"]
        if preloader is None or not preloader.alive or not limit:
            return
        idle = now - preloader.last_fork
        if idle > limit and not group.spawning:
            preloader.stop(f"idle for {idle:.0f} s (max_preloader_idle_time)")


def private_memory(proc: Process) -> int | None:
    """The process's private memory in bytes (USS: what stopping it would free), or None when it
    cannot be read."""
    try:
        return int(psutil.Process(proc.pid).memory_full_info().uss)
    except (psutil.Error, OSError):
        return None
