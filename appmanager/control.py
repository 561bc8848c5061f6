"""The control plane, core side: answering status/restart/stop/detach and publishing events.

See ``docs/protocol/control.md``. A ControlServer lives as long as the core; its sockets are in the
instance directory, which only the core's user can enter. It uses a ROUTER socket so that a slow
command (a restart waits for new processes) never delays another (a status).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import psutil
import zmq
import zmq.asyncio

from appmanager import __version__
from appmanager.states import ProcessState

if TYPE_CHECKING:
    from appmanager.core import Core
    from appmanager.group import Group
    from appmanager.process import Process

log = logging.getLogger("appmanager")


class ControlServer:
    """Serves the control protocol for one core."""

    def __init__(self, core: Core, directory: str) -> None:
        self.core = core
        self.control_path = os.path.join(directory, "control.sock")
        self.events_path = os.path.join(directory, "events.sock")
        self._context = zmq.asyncio.Context()
        self._router = self._context.socket(zmq.ROUTER)
        self._pub = self._context.socket(zmq.PUB)
        self._tasks: set[asyncio.Task[None]] = set()
        self._serving: asyncio.Task[None] | None = None
        self._cpu: dict[int, psutil.Process] = {}

    def start(self) -> None:
        for sock in (self._router, self._pub):
            sock.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 1000)
        old_umask = os.umask(0o177)  # the socket files are created owner-only
        try:
            self._router.bind(f"ipc://{self.control_path}")
            self._pub.bind(f"ipc://{self.events_path}")
        finally:
            os.umask(old_umask)
        self._serving = asyncio.get_running_loop().create_task(self._serve())

    def close(self) -> None:
        if self._serving is not None:
            self._serving.cancel()
        for task in self._tasks:
            task.cancel()
        self._router.close(0)
        self._pub.close(0)
        self._context.term()

    def emit(self, event: str, **fields: Any) -> None:
        """Publish one event; dropped, never waited for, when nobody keeps up."""
        message = {"event": event, "time": time.time(), **fields}
        try:
            self._pub.send(json.dumps(message).encode(), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    async def _serve(self) -> None:
        while True:
            try:
                frames = await self._router.recv_multipart()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError:
                return
            task = asyncio.get_running_loop().create_task(self._answer(frames))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, frames: list[bytes]) -> None:
        identity, payload = frames[0], frames[-1]
        try:
            request = json.loads(payload)
            if not isinstance(request, dict):
                raise ValueError("not an object")
            reply = await self._dispatch(request)
        except ValueError as exc:
            reply = {"ok": False, "error": f"unreadable request: {exc}"}
        except Exception as exc:  # a bug must not take the control plane down
            log.exception("control command failed")
            reply = {"ok": False, "error": f"internal error: {exc}"}
        try:
            await self._router.send_multipart([identity, b"", json.dumps(reply).encode()])
        except zmq.ZMQError:
            pass

    async def _dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        if command == "status":
            return {"ok": True, "status": self.status()}
        if command == "stop":
            timeout = request.get("timeout")
            self.core.request_stop(float(timeout) if timeout is not None else None)
            return {"ok": True, "pid": os.getpid()}
        if command == "detach":
            return await self._detach(int(request.get("pid", 0)))
        if command == "restart":
            return await self._restart(request.get("app"))
        return {"ok": False, "error": f"unknown command {command!r}"}

    async def _detach(self, pid: int) -> dict[str, Any]:
        for group in self.core.pool.groups:
            for proc in group.processes:
                if proc.pid == pid:
                    done = proc.exited_future()
                    proc.retire("detached by the operator")
                    group.replace_soon()
                    await done
                    return {"ok": True}
        return {"ok": False, "error": f"no app process has pid {pid}"}

    async def _restart(self, app: str | None) -> dict[str, Any]:
        groups = self.core.pool.groups
        if app:
            wanted = os.path.realpath(app)
            groups = [g for g in groups if os.path.realpath(g.spec.root) == wanted]
            if not groups:
                return {"ok": False, "error": f"no app with root {app}"}
        restarted: list[str] = []
        for group in groups:
            error = await group.restart()
            if error is not None:
                return {"ok": False, "error": f"app {group.name}: {error}", "restarted": restarted}
            restarted.append(group.spec.root)
        return {"ok": True, "restarted": restarted}

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        core = self.core
        now = time.time()
        pool = core.pool
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started_at": core.started_at,
            "uptime": now - core.started_at,
            "url": core.url,
            "max_pool_size": pool.max_pool_size,
            "process_count": pool.process_count(),
            "requests_queued": sum(len(g.wait_list) for g in pool.groups),
            "apps": [self._group_status(g, now) for g in pool.groups],
        }

    def _group_status(self, group: Group, now: float) -> dict[str, Any]:
        error = group.boot_error
        preloader = group.preloader
        return {
            "name": group.name,
            "root": group.spec.root,
            "type": group.app_type,
            "environment": group.settings["environment"],
            "server_names": list(group.server_names),
            "base_uri": group.base_uri,
            "queue": len(group.wait_list),
            "spawning": group.spawning,
            "boot_error": None if error is None else {"step": error.step, "message": error.message},
            "preloader": {"pid": preloader.pid} if preloader is not None else None,
            "processes": [
                self._process_status(p, now)
                for p in group.processes
                if p.state is not ProcessState.EXITED
            ],
        }

    def _process_status(self, proc: Process, now: float) -> dict[str, Any]:
        info: dict[str, Any] = {
            "pid": proc.pid,
            "state": proc.state.name,
            "sessions": len(proc.sessions),
            "processed": proc.processed,
            "uptime": now - proc.spawned_at,
            "last_used": time.monotonic() - proc.last_used,
            "cpu_percent": None,
            "rss": None,
            "pss": None,
            "uss": None,
        }
        handle = self._cpu.get(proc.pid)
        try:
            if handle is None:
                handle = self._cpu[proc.pid] = psutil.Process(proc.pid)
            info["cpu_percent"] = handle.cpu_percent(None)
            memory = handle.memory_full_info()
            info["rss"] = memory.rss
            info["pss"] = getattr(memory, "pss", None)
            info["uss"] = getattr(memory, "uss", None)
        except (psutil.Error, OSError):
            self._cpu.pop(proc.pid, None)
        return info
