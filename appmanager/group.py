"""A Group: one app, its processes, its wait-list and its spawn state."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import time
from typing import TYPE_CHECKING

from appmanager import balancer, errors, spawner
from appmanager.config import AppConfig
from appmanager.metrics import AppMetrics
from appmanager.spawnerror import SpawnError
from appmanager.states import ProcessState

if TYPE_CHECKING:
    from appmanager.front import Connection
    from appmanager.pool import Pool
    from appmanager.preloader import Preloader
    from appmanager.process import Process
    from appmanager.request import Request
    from appmanager.session import Session

log = logging.getLogger("appmanager")

MAX_BACKOFF = 60.0


class Group:
    """One app (an app root and its settings) in the Pool.

    A Group outlives its Processes: it is created when the core starts and lives until it stops.
    It owns the app's processes (spawning, ready and stopping ones), the wait-list of requests
    that no process could take yet, and the spawn state: the last boot error and the backoff
    before the next attempt. Invariants: a request is in the wait-list only while no READY process
    can take it; the wait-list never holds more than ``max_request_queue_size`` requests (when
    that is not 0).
    """

    def __init__(self, pool: Pool, app: AppConfig) -> None:
        self.pool = pool
        self.name = app.name
        self.spec = app.spec
        self.settings = app.settings
        self.server_names = tuple(n.lower() for n in app.server_names)
        self.host_names = frozenset(n.encode("idna") for n in self.server_names)
        self.base_uri = app.base_uri
        self._base = app.base_uri.encode()
        # The type the app's shim reported (a Python app becomes wsgi or asgi once it booted).
        self.app_type = app.spec.app_type
        # Node and ASGI apps take whole connections once a process said it takes them (READY),
        # when every request is theirs; the others, and those beside other apps, take one
        # request at a time.
        self.per_connection = False
        method = self.settings["spawn_method"]
        self.smart = app.spec.language in ("python", "ruby") and method != "direct"
        self.preloader: Preloader | None = None
        self.metrics = AppMetrics()
        custom = self.settings["custom_error_page"]
        self._custom_page: str | None = None
        if custom:
            with open(custom, encoding="utf-8", errors="replace") as f:
                self._custom_page = f.read()
        # Restart triggers: restart.txt's last modification seen, always_restart.txt's presence.
        restart_dir = os.path.join(app.spec.root, self.settings["restart_dir"])
        self._restart_txt = os.path.join(restart_dir, "restart.txt")
        self._always_txt = os.path.join(restart_dir, "always_restart.txt")
        self._restart_mtime = _mtime(self._restart_txt)
        self.always_restart = os.path.exists(self._always_txt)
        self._restarting: asyncio.Task[str | None] | None = None
        self._preloader_starting: asyncio.Future[Preloader] | None = None
        self.processes: list[Process] = []
        self.spawning = 0
        # Waiting requests; for an app that takes whole connections (Node), the bytes read so far.
        self.wait_list: collections.deque[tuple[Connection, Request | bytes]] = collections.deque()
        self.boot_error: SpawnError | None = None
        self.failures = 0
        self.next_spawn_at = 0.0
        self._retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Replaced by a Group with new settings (connector.py): it takes no new requests, its
        # processes finish theirs and stop, and it leaves the pool once they have exited.
        self.retired = False

    def matches(self, host: bytes, path: bytes) -> bool:
        """Does a request for ``host`` (lowercase, no port) and ``path`` belong to this app?"""
        if self.host_names and host not in self.host_names:
            return False
        if self._base:
            if not path.startswith(self._base):
                return False
            rest = path[len(self._base) : len(self._base) + 1]
            return rest in (b"", b"/", b"?")
        return True

    async def get_preloader(self) -> Preloader:
        """The app's preloader, started if there is none; concurrent callers share one start."""
        if self.preloader is not None and self.preloader.alive:
            return self.preloader
        if self._preloader_starting is None:
            loop = asyncio.get_running_loop()
            self._preloader_starting = loop.create_future()
            try:
                self.preloader = await spawner.start_preloader(self)
            except BaseException as exc:
                self._preloader_starting.set_exception(exc)
                self._preloader_starting.exception()  # retrieved: waiters get it too
                self._preloader_starting = None
                raise
            self._preloader_starting.set_result(self.preloader)
            self._preloader_starting = None
            return self.preloader
        return await asyncio.shield(self._preloader_starting)

    def on_preloader_gone(self, preloader: Preloader) -> None:
        if self.preloader is preloader:
            self.preloader = None

    @property
    def development(self) -> bool:
        return bool(self.settings["environment"] == "development")

    def live_count(self) -> int:
        """Processes that count against the pool: spawning, ready and stopping ones."""
        # Every process in ``processes`` is alive: it is removed when reaped.
        return self.spawning + len(self.processes)

    def ready_count(self) -> int:
        return sum(1 for p in self.processes if p.state is ProcessState.READY)

    # -- requests --------------------------------------------------------------------------------

    def dispatch(self, conn: Connection, request: Request | bytes) -> None:
        """Hand ``request`` to the least-busy process, or put it in the wait-list. For an app that
        takes whole connections, ``request`` is the bytes read so far from the connection."""
        if self.always_restart:
            # tmp/always_restart.txt (development): every request gets freshly loaded code. The
            # restart is blocking, so the request waits for the new process.
            if self._restarting is None or self._restarting.done():
                self.restart_soon(rolling=False)
            self.wait_list.append((conn, request))
            conn.waiting = self
            return
        while True:
            proc = balancer.least_busy(self.processes)
            if proc is None:
                break
            if self._hand(proc, conn, request):
                return
        if (
            self.boot_error is not None
            and self.ready_count() == 0
            and self.spawning == 0
            and time.monotonic() < self.next_spawn_at
        ):
            # Still backing off after a failed boot: answer with the error instead of waiting.
            _discard(request)
            self._answer_boot_error(conn)
            return
        self._grow()
        limit = self.settings["max_request_queue_size"]
        if limit and len(self.wait_list) >= limit:
            log.warning("app %s: request queue full (%d), answering 503", self.name, limit)
            self.pool.emit("queue_overflow", app=self.name, queue=len(self.wait_list))
            self.metrics.overflows += 1
            if not isinstance(request, bytes):
                self.pool.log_access(conn, request.head, 503, None)
            _discard(request)
            conn.respond(errors.simple_response(503, "request queue full", close=False))
            return
        self.wait_list.append((conn, request))
        conn.waiting = self

    def _hand(self, proc: Process, conn: Connection, request: Request | bytes) -> bool:
        if isinstance(request, bytes):
            if proc.takes_connections:
                return proc.handoff_connection(conn, request)
            # The app no longer takes whole connections (an ASGI app that became a WSGI one
            # across a restart): the core reads this connection's requests again.
            conn.buf[:0] = request
            conn.busy = False
            conn._next_request()
            return True
        return proc.handoff(conn, request, self.pool.keep_alive(request))

    def cancel_wait(self, conn: Connection) -> None:
        """The client of a waiting request went away."""
        for i, (waiting, request) in enumerate(self.wait_list):
            if waiting is conn:
                del self.wait_list[i]
                _discard(request)
                return

    def on_session_done(
        self,
        proc: Process,
        session: Session,
        keep: bool,
        status: int | None = None,
        size: int | None = None,
    ) -> None:
        """A process finished a request (or a whole connection closed): serve the wait-list
        first, then the connection's next."""
        if session.head:
            if self.pool.access_log is not None:
                self.pool.log_access(session.conn, session.head, status, size)
            self.metrics.observe(time.monotonic() - session.started)
        if not self._over_request_limit(proc):
            self.serve_waiting(proc)
            if self.pool.starved and not proc.sessions:
                self.pool.on_process_idle()
        session.conn.on_response_done(keep)

    def on_requests_counted(self, proc: Process, count: int) -> None:
        """A process that takes whole connections reports ``count`` more requests served."""
        self.metrics.requests += count
        self._over_request_limit(proc)

    def _over_request_limit(self, proc: Process) -> bool:
        """Retire ``proc`` when it has served its max_requests (staggered); True if so."""
        if not proc.request_limit or proc.processed < proc.request_limit:
            return False
        if proc.state is ProcessState.READY:
            proc.retire(f"served {proc.processed} requests (max_requests)")
            self.replace_soon()
        return True

    def replace_soon(self) -> None:
        """A process is being retired: start its successor now if the limits allow, so that
        requests wait as little as possible."""
        self.ensure_min_instances()
        if self.wait_list:
            self._grow()

    def serve_waiting(self, proc: Process) -> None:
        """Give waiting requests to ``proc`` while it has room."""
        while self.wait_list and proc.can_take():
            conn, request = self.wait_list.popleft()
            conn.waiting = None
            if not self._hand(proc, conn, request):
                self.wait_list.appendleft((conn, request))
                conn.waiting = self
                return

    def _answer_boot_error(self, conn: Connection) -> None:
        assert self.boot_error is not None
        if self._custom_page is not None:
            page = self._custom_page
        else:
            friendly = self.settings["friendly_error_pages"]
            details = self.development if friendly is None else bool(friendly)
            page = errors.boot_error_page(self.name, self.boot_error, details=details)
        conn.respond(errors.html_response(500, page))

    # -- spawning --------------------------------------------------------------------------------

    def ensure_min_instances(self) -> None:
        """Start processes until ``min_instances`` are running or starting."""
        if self.pool.stopping or self.retired or time.monotonic() < self.next_spawn_at:
            return
        while self.serving_count() < self.settings["min_instances"] and self._has_room():
            self._spawn()

    def _grow(self) -> None:
        """Every process is busy: start more if the limits allow. Several spawns may run at once,
        up to one per waiting request, so that a burst is not served one spawn at a time."""
        if self.pool.stopping or self.retired or time.monotonic() < self.next_spawn_at:
            return
        wanted = max(1, len(self.wait_list))
        while self.spawning < wanted:
            if not self._has_room():
                if self.serving_count() == 0 and not self.spawning:
                    self.pool.evict_for(self)
                return
            self._spawn()

    def _has_room(self) -> bool:
        """May one more process start: within max_instances_per_app and max_pool_size?"""
        per_app = self.settings["max_instances_per_app"]
        if per_app and self.live_count() >= per_app:
            return False
        return self.pool.has_room()

    def serving_count(self) -> int:
        """Processes that are, or will soon be, taking requests: spawning and READY ones."""
        return self.spawning + self.ready_count()

    def idlest(self) -> Process | None:
        """The READY process idle the longest, or None when every process is busy."""
        idle = [p for p in self.processes if p.state is ProcessState.READY and not p.sessions]
        return min(idle, key=lambda p: p.last_used, default=None)

    def _spawn(self) -> None:
        self.spawning += 1
        task = asyncio.get_running_loop().create_task(self._run_spawn())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_spawn(self) -> None:
        try:
            proc = await spawner.spawn(self)
        except SpawnError as exc:
            self.spawning -= 1
            self._spawn_failed(exc)
            return
        except Exception as exc:  # a bug in the core's spawning must not kill the group
            log.exception("app %s: spawn failed unexpectedly", self.name)
            self.spawning -= 1
            self._spawn_failed(SpawnError("PREPARE", repr(exc)))
            return
        self.spawning -= 1
        self._add_ready(proc)

    def _add_ready(self, proc: Process) -> None:
        """A spawned process answered READY: take it into the group and give it work."""
        if self.pool.stopping or self.retired:
            proc.start_serving()
            self.processes.append(proc)
            proc.stop()
            return
        self.boot_error = None
        self.failures = 0
        self.next_spawn_at = 0.0
        limit = self.settings["max_requests"]
        if limit:
            # Staggered: up to 10% more, so that processes started together do not all retire
            # together.
            proc.request_limit = limit + random.randint(0, limit // 10)
        self.processes.append(proc)
        # A process takes whole connections only when every request is this app's: behind host
        # or path routing, or a connector, a connection's next request could be another app's.
        self.per_connection = proc.takes_connections and self.pool.takes_every_request(self)
        proc.start_serving()
        self.pool.emit("spawned", app=self.name, pid=proc.pid)
        self.pool.on_process_ready(self)
        self.serve_waiting(proc)
        if self.wait_list:
            self._grow()

    def check_restart_files(self) -> None:
        """Called every few seconds: a touched restart.txt restarts the app."""
        self.always_restart = os.path.exists(self._always_txt)
        mtime = _mtime(self._restart_txt)
        if mtime != self._restart_mtime:
            self._restart_mtime = mtime
            if mtime is not None:
                log.info("app %s: %s changed; restarting", self.name, self._restart_txt)
                self.restart_soon()

    def restart_soon(self, rolling: bool | None = None) -> asyncio.Task[str | None]:
        """Start a restart, or join the one under way (one at a time per app). ``rolling``
        None follows the rolling_restarts setting."""
        if self._restarting is None or self._restarting.done():
            if rolling is None:
                rolling = bool(self.settings["rolling_restarts"])
            task = asyncio.get_running_loop().create_task(self._restart(rolling))
            self._restarting = task
        return self._restarting

    async def restart(self) -> str | None:
        """Restart the app (see ``_restart``); concurrent callers share one restart."""
        return await self.restart_soon()

    async def _restart(self, rolling: bool) -> str | None:
        """Replace every process with a new one. Rolling (the default): each new process is
        ready before an old one is retired, and old ones finish their requests, so no request
        waits. Blocking (``rolling_restarts`` off): the old processes are retired first and
        requests wait in the wait-list, none failing. When the new version cannot boot, the old
        processes keep serving (rolling) and the error is returned and kept in ``boot_error``."""
        self.pool.emit("restart_begun", app=self.name)
        log.info("app %s: restart begun", self.name)
        old = [p for p in self.processes if p.state is ProcessState.READY]
        if self.preloader is not None:
            # A fresh preloader loads the new code; the old one would fork the old.
            self.preloader.stop("the app is restarting")
            self.preloader = None
        count = max(1, self.settings["min_instances"], len(old))
        if not rolling:
            for proc in old:
                proc.retire("the app is restarting")
            old = []
        for _ in range(count):
            if not self._has_room() and old:
                old.pop(0).retire("the app is restarting")
            self.spawning += 1
            try:
                proc = await spawner.spawn(self)
            except SpawnError as exc:
                self.spawning -= 1
                log.error("app %s: restart failed, old processes keep serving: %s", self.name, exc)
                if exc.traceback:
                    log.error("app %s: %s", self.name, exc.traceback.rstrip())
                self.boot_error = exc
                self.pool.emit("spawn_failed", app=self.name, step=exc.step, message=exc.message)
                if not self.ready_count():
                    self._spawn_failed(exc)
                return str(exc)
            self.spawning -= 1
            self._add_ready(proc)
            if old:
                old.pop(0).retire("the app is restarting")
        for proc in old:
            proc.retire("the app is restarting")
        log.info("app %s: restart finished", self.name)
        self.pool.emit("restart_finished", app=self.name)
        return None

    def _spawn_failed(self, error: SpawnError) -> None:
        self.failures += 1
        self.metrics.spawn_failures += 1
        delay = min(MAX_BACKOFF, 2.0 ** (self.failures - 1))
        self.next_spawn_at = time.monotonic() + delay
        self.boot_error = error
        log.error(
            "app %s failed to start: %s (attempt %d; next attempt in %.0f s)",
            self.name,
            error,
            self.failures,
            delay,
        )
        if error.traceback:
            log.error("app %s: %s", self.name, error.traceback.rstrip())
        if self.ready_count() == 0:
            waiting = list(self.wait_list)
            self.wait_list.clear()
            for conn, request in waiting:
                conn.waiting = None
                _discard(request)
                self._answer_boot_error(conn)
        self.pool.emit("spawn_failed", app=self.name, step=error.step, message=error.message)
        self.pool.on_spawn_failed(self)
        if self.retired:
            if self.live_count() == 0:
                self.pool.remove_group(self)
            return
        if not self.pool.stopping and self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(delay, self._retry_spawn)

    def _retry_spawn(self) -> None:
        self._retry = None
        self.ensure_min_instances()

    # -- process deaths --------------------------------------------------------------------------

    def on_process_lost(self, proc: Process, had_sessions: bool) -> None:
        """A process's control channel closed (it is exiting, or it crashed): replace it now,
        without waiting for it to be reaped."""
        if self.pool.stopping:
            return
        self.ensure_min_instances()
        if self.wait_list:
            self._grow()

    def on_process_exited(self, proc: Process) -> None:
        """A process was reaped: forget it and replace it when the app needs one."""
        if proc in self.processes:
            self.processes.remove(proc)
        self.pool.on_process_exited(self)
        if self.retired and self.live_count() == 0:
            self.pool.remove_group(self)
        if self.pool.stopping or self.retired:
            return
        self.ensure_min_instances()
        if self.wait_list:
            self._grow()

    # -- stopping --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process (each finishes its requests first), and the preloader."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self.preloader is not None:
            self.preloader.stop("the core is stopping")
        for proc in list(self.processes):
            proc.stop()

    def retire(self, successor: Group) -> None:
        """New settings for this app: ``successor`` takes the waiting requests and every new
        one; this group's processes finish their requests and stop."""
        self.retired = True
        waiting = list(self.wait_list)
        self.wait_list.clear()
        for conn, request in waiting:
            conn.waiting = None
            conn.group = successor
            successor.dispatch(conn, request)
        self.stop()
        if self.live_count() == 0:
            self.pool.remove_group(self)

    def busy(self) -> bool:
        """Are requests waiting or in flight? (Whole connections a process holds do not count:
        its shim finishes their requests and closes them when it stops.)"""
        if self.wait_list:
            return True
        return any(s.head for p in self.processes for s in p.sessions.values())

    def verify_invariants(self) -> None:
        limit = self.settings["max_request_queue_size"]
        assert not limit or len(self.wait_list) <= limit
        if self.wait_list:
            assert not any(p.can_take() for p in self.processes)
        for proc in self.processes:
            assert proc.group is self
            proc.verify_invariants()


def _discard(request: Request | bytes) -> None:
    if not isinstance(request, bytes):
        request.discard()


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None
