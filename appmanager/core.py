"""The core: one asyncio (uvloop) loop that owns the listeners, the connections and the Pool.

A Core lives for one ``appmanager start``: it creates the instance directory, listens, starts
``min_instances`` processes of each app, prints the banner, serves until SIGINT or SIGTERM, then
drains and stops everything and removes the instance directory.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from typing import Any, TextIO

from appmanager import __version__, instances
from appmanager.accesslog import AccessLog
from appmanager.config import Plan
from appmanager.connector import ConnectorApps, secret_path, write_secret
from appmanager.control import ControlServer
from appmanager.front import Connection, Listener, listen_tcp, listen_unix
from appmanager.group import Group
from appmanager.metrics import MetricsServer
from appmanager.pool import Pool
from appmanager.prestart import pre_start
from appmanager.reaper import Reaper

log = logging.getLogger("appmanager")

PR_SET_CHILD_SUBREAPER = 36
IDLE_TIMEOUT = 75.0  # keep-alive connections with no request for this long are closed
READ_TIMEOUT = 60.0  # a request that stalls this long while being read gets 408
# At shutdown, a connection accepted but not yet sending gets this long to send its request.
FRESH_GRACE = 1.0


class StartError(Exception):
    """The core cannot start; the message says why (printed as one line)."""


class InstanceDir:
    """The instance directory: the core's private place for sockets, state and spooled bodies.

    Created owner-only at start and removed at stop (only what this instance created). When the
    connector socket lives inside it, the directory is 0711 instead: a web server's workers may
    reach the socket by its name, but nobody else may list or write the directory, and its
    control sockets and state stay owner-only.
    """

    def __init__(self, path: str | None, traversable: bool = False) -> None:
        self.created = False
        if path is None:
            base = os.environ.get("XDG_RUNTIME_DIR")
            if not base or not os.access(base, os.W_OK):
                base = None
            self.path = tempfile.mkdtemp(prefix="appmanager.", dir=base)
            self.created = True
        else:
            self.path = os.path.abspath(path)
            state = os.path.join(self.path, "core.json")
            if os.path.exists(state) and _core_alive(state):
                raise StartError(f"instance directory {self.path} is in use by a running core")
            if not os.path.isdir(self.path):
                os.makedirs(self.path, mode=0o700)
                self.created = True
            else:
                info = os.lstat(self.path)
                if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                    # A directory someone else made (in /tmp, say) could be theirs to read.
                    raise StartError(
                        f"instance directory {self.path} is not a directory of this user's "
                        "(--instance-dir)"
                    )
                # An empty directory handed over (a web server module's mkdtemp, or `appmanager
                # core` creating it for its socket) is this instance's to remove.
                self.created = not os.listdir(self.path)
        os.chmod(self.path, 0o711 if traversable else 0o700)
        self.spool = os.path.join(self.path, "spool")
        os.makedirs(self.spool, mode=0o700, exist_ok=True)

    def write_state(self, state: dict[str, Any]) -> None:
        tmp = os.path.join(self.path, "core.json.tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(state, f, indent=2)
        os.replace(tmp, os.path.join(self.path, "core.json"))

    def remove(self) -> None:
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for name in ("core.json", "spool"):
            target = os.path.join(self.path, name)
            if os.path.isdir(target):
                shutil.rmtree(target, ignore_errors=True)
            elif os.path.exists(target):
                os.unlink(target)


def _core_alive(state_path: str) -> bool:
    try:
        with open(state_path) as f:
            pid = int(json.load(f)["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError):
        return False
    return True


class Core:
    """The appmanager core process; see the module docstring for its lifetime."""

    def __init__(self, plan: Plan, lifeline_fd: int | None = None) -> None:
        self.plan = plan
        self.settings = plan.settings
        self.apps = plan.apps
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.pool = Pool(plan.settings)
        self.connector_apps = ConnectorApps(self.pool, plan.settings)
        user = plan.settings["connector_user"]
        self.connector_uid: int | None = pwd.getpwnam(user).pw_uid if user else None
        # The read end of a pipe a web server holds open (docs/protocol/connector.md): EOF on it
        # means the web server is gone, and the core stops as on SIGTERM.
        self.lifeline_fd = lifeline_fd
        self._tcp: socket.socket | None = None
        # What a connector's requests must carry in ``!~Secret`` (docs/protocol/connector.md).
        self.connector_secret = b""
        self.reaper = Reaper(self.pool)
        self.control: ControlServer | None = None
        self.metrics: MetricsServer | None = None
        # True once start-up is done, until the core begins to stop (/healthz).
        self.ready = False
        self.connections: set[Connection] = set()
        self.listeners: list[Listener] = []
        self.stopping = False
        self.instance: InstanceDir | None = None
        self.spool_dir: str | None = None
        self._stop_event: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.started_at = time.time()

    # -- start -----------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the instance directory and the listening sockets (before daemonizing, so that
        errors reach the terminal)."""
        socket_path = self.settings["socket"]
        inside = False
        if socket_path and self.settings["instance_dir"]:
            instance_dir = os.path.abspath(self.settings["instance_dir"])
            inside = os.path.dirname(os.path.abspath(socket_path)) == instance_dir
        self.instance = InstanceDir(self.settings["instance_dir"], traversable=inside)
        self.spool_dir = self.instance.spool
        if not self.plan.connector_only:
            try:
                self._tcp = listen_tcp(self.settings["address"], self.settings["port"])
            except OSError as exc:
                self.instance.remove()
                where = f"{self.settings['address']}:{self.settings['port']}"
                raise StartError(
                    f"cannot listen on {where} (--port): {exc.strerror or exc}"
                ) from None
        self._unix: socket.socket | None = None
        if socket_path:
            try:
                # Before the socket accepts: a module reads the secret once it can connect.
                self.connector_secret = write_secret(socket_path)
                self._unix = listen_unix(socket_path)
            except OSError as exc:
                if self._tcp is not None:
                    self._tcp.close()
                self.instance.remove()
                raise StartError(
                    f"cannot listen on {self.settings['socket']} (--socket): {exc.strerror or exc}"
                ) from None

    @property
    def url(self) -> str:
        if self._tcp is None:
            return f"unix:{self.settings['socket']}"
        host = self.settings["address"]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._tcp.getsockname()[1]}/"

    async def run(self, banner: TextIO | None) -> int:
        """Serve until told to stop; return the exit status."""
        self.loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._changed = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(sig, self._on_stop_signal, sig)
        # Processes forked by a preloader outlive it as the core's children; app processes'
        # own orphans come here too, and are reaped in the sweep.
        _become_subreaper()
        self.loop.add_signal_handler(signal.SIGUSR1, self._reopen_logs)
        self.loop.add_signal_handler(signal.SIGHUP, self._restart_all)
        if self._tcp is not None:
            self.listeners.append(Listener(self, self._tcp, self.url))
        if self._unix is not None:
            self.listeners.append(Listener(self, self._unix, self.settings["socket"]))
        self.pool.changed = self._changed.set
        for app in self.apps:
            self.pool.add_group(Group(self.pool, app))
        # Open before the first spawn: SPAWN tells Node processes whether to report responses.
        if self.settings["access_log"]:
            self.pool.access_log = AccessLog(self.settings["access_log"])
        self.pool.start()
        await self._wait_for_min_instances()
        self._schedule_sweep()
        assert self.instance is not None
        self.instance.write_state(
            {
                "pid": os.getpid(),
                "version": __version__,
                "url": self.url,
                "socket": self.settings["socket"],
                "started_at": self.started_at,
                "apps": [app.spec.root for app in self.apps],
            }
        )
        if self.settings["metrics_address"]:
            self.metrics = MetricsServer(self, self.settings["metrics_address"])
            try:
                await self.metrics.start()
            except OSError as exc:
                log.error(
                    "cannot serve metrics on %s (--metrics-address): %s",
                    self.settings["metrics_address"],
                    exc.strerror or exc,
                )
                self.metrics = None
        self.ready = True
        self.control = ControlServer(self, self.instance.path)
        self.control.start()
        self.pool.emit = self.control.emit
        instances.register(self.instance.path)
        if banner is not None:
            self._print_banner(banner)
        if self.lifeline_fd is not None:
            os.set_blocking(self.lifeline_fd, False)
            self.loop.add_reader(self.lifeline_fd, self._on_lifeline)
        for url in self.settings["pre_start"] or ():
            task = self.loop.create_task(pre_start(url, self._stop_event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        log.info("appmanager %s ready at %s (pid %d)", __version__, self.url, os.getpid())
        await self._stop_event.wait()
        await self._shutdown()
        return 0

    async def _wait_for_min_instances(self) -> None:
        """Return once every group has its ``min_instances`` ready, or has failed to boot."""
        assert self._changed is not None and self._stop_event is not None
        while not self._stop_event.is_set():
            pending = [
                g
                for g in self.pool.groups
                if g.ready_count() < g.settings["min_instances"] and g.boot_error is None
            ]
            if not pending:
                return
            self._changed.clear()
            await self._changed.wait()

    def _print_banner(self, out: TextIO) -> None:
        lines = [f"appmanager {__version__}"]
        for group in self.pool.groups:
            spec = group.spec
            if len(self.pool.groups) > 1:
                lines.append(f"  app {group.name}:")
            lines.append(f"  app root:     {spec.root}")
            startup = os.path.relpath(spec.startup_file, spec.root) if spec.startup_file else ""
            what = startup or spec.command
            lines.append(f"  app type:     {group.app_type} ({what})")
            lines.append(f"  environment:  {group.settings['environment']}")
            if group.server_names:
                lines.append(f"  server names: {', '.join(group.server_names)}")
            if group.base_uri:
                lines.append(f"  base uri:     {group.base_uri}")
            if group.boot_error is not None:
                lines.append(f"  status:       failed to start: {group.boot_error}")
        lines.append(f"  url:          {self.url}")
        if self.settings["socket"]:
            lines.append(f"  socket:       {self.settings['socket']}")
        lines.append(f"  pid:          {os.getpid()}")
        lines.append(f"  log file:     {self.settings['log_file'] or 'standard error'}")
        assert self.instance is not None
        lines.append(f"  instance dir: {self.instance.path}")
        lines.append("Serving; press Ctrl-C to stop.")
        out.write("\n".join(lines) + "\n")
        out.flush()

    # -- housekeeping ----------------------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            conn.sweep(now, IDLE_TIMEOUT, READ_TIMEOUT)
        if not self.stopping:
            self.reaper.sweep()
        self._reap_orphans()
        if self.pool.access_log is not None:
            self.pool.access_log.flush()
        self._schedule_sweep()

    def _restart_all(self) -> None:
        """SIGHUP: restart every app (rolling, as configured)."""
        log.info("received SIGHUP; restarting every app")
        for group in self.pool.groups:
            group.restart_soon()

    def _requests_pending(self) -> bool:
        """Do connections accepted before the stop still owe (or hold part of) a request? A
        fresh connection gets FRESH_GRACE seconds to send its first one."""
        now = time.monotonic()
        for conn in self.connections:
            if conn.closed or conn.lingering or conn.handed or conn.busy:
                continue
            if conn.reader is not None or conn.buf:
                return True
            if conn.served == 0 and now - conn.created < FRESH_GRACE:
                return True
        return False

    def _reopen_logs(self) -> None:
        if self.pool.access_log is not None:
            self.pool.access_log.reopen()
        reopen_logs()

    def _reap_orphans(self) -> None:
        """Reap exited children that no Process or Preloader watches (orphans the core inherited
        as a subreaper). Watched ones are left to their own pidfd handlers. (uvloop keeps SIGCHLD
        for itself, so this peeks with waitid once a sweep instead.)"""
        watched = {p.pid for g in self.pool.groups for p in g.processes}
        watched |= {g.preloader.pid for g in self.pool.groups if g.preloader is not None}
        for _ in range(64):
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid in watched:
                return
            try:
                os.waitpid(info.si_pid, os.WNOHANG)
            except ChildProcessError:
                return

    # -- stop ------------------------------------------------------------------------------------

    def request_stop(self, timeout: float | None) -> None:
        """Stop gracefully, as SIGTERM does (asked for over the control channel)."""
        assert self._stop_event is not None
        if timeout is not None:
            self.settings["shutdown_timeout"] = timeout
        log.info("stop requested over the control channel")
        self._stop_event.set()

    def _on_lifeline(self) -> None:
        assert self.lifeline_fd is not None and self._stop_event is not None
        try:
            data = os.read(self.lifeline_fd, 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            return  # nothing is ever written; ignore
        self.loop.remove_reader(self.lifeline_fd)
        if not self._stop_event.is_set():
            log.info("the web server that started the core has exited; stopping")
            self._stop_event.set()

    def _on_stop_signal(self, sig: int) -> None:
        assert self._stop_event is not None
        if self._stop_event.is_set():
            log.warning("second %s: stopping now", signal.Signals(sig).name)
            self.settings["shutdown_timeout"] = 0
            if self._changed is not None:
                self._changed.set()
            return
        log.info("received %s; stopping", signal.Signals(sig).name)
        self._stop_event.set()

    async def _shutdown(self) -> None:
        """Stop accepting, let queued and in-flight requests finish, stop every process."""
        assert self._changed is not None
        self.ready = False
        self.stopping = True
        for listener in self.listeners:
            listener.close()
        if self._unix is not None and self.settings["socket"]:
            for path in (self.settings["socket"], secret_path(self.settings["socket"])):
                try:
                    os.unlink(path)
                except OSError:
                    pass
        for conn in list(self.connections):
            if conn.idle_between_requests():
                conn.close()
        deadline = time.monotonic() + self.settings["shutdown_timeout"]
        while (self.pool.busy() or self._requests_pending()) and time.monotonic() < deadline:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), 0.1)
            except TimeoutError:
                pass
        if self.pool.busy():
            log.warning("shutdown timeout reached with requests in flight")
        self.pool.stop()
        deadline = time.monotonic() + 20
        while not self.pool.all_exited() and time.monotonic() < deadline:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), 0.1)
            except TimeoutError:
                pass
        for conn in list(self.connections):
            conn._close_now()
        for task in self._tasks:
            task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.pool.access_log is not None:
            self.pool.access_log.close()
        instances.unregister()
        assert self.instance is not None
        self.instance.remove()
        log.info("appmanager stopped")


def _become_subreaper() -> None:
    """Make orphaned descendants re-parent to the core (Linux PR_SET_CHILD_SUBREAPER)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("cannot become a child subreaper; smart spawning's processes may be orphaned")


def reopen_logs() -> None:
    """SIGUSR1 (logrotate's postrotate): close the log files; each reopens on its next line."""
    for handler in logging.getLogger("appmanager").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.close()
    log.info("log files reopened (SIGUSR1)")


def configure_logging(settings: dict[str, Any]) -> None:
    """Log to the log file, or standard error, with a fixed line shape."""
    handler: logging.Handler
    if settings["log_file"]:
        handler = logging.FileHandler(settings["log_file"])
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s.%(msecs)03d [appmanager {os.getpid()}] %(levelname)s %(message)s",
            "%Y-%m-%d %H:%M:%S",
        )
    )
    root = logging.getLogger("appmanager")
    root.handlers[:] = [handler]
    root.setLevel(settings["log_level"].upper())
    root.propagate = False
