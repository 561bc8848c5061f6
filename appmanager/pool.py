"""The Pool: every app of one core, and the limit on processes across them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from appmanager.group import Group

if TYPE_CHECKING:
    from appmanager.accesslog import AccessLog
    from appmanager.front import Connection
    from appmanager.request import Request

log = logging.getLogger("appmanager")


class Pool:
    """All Groups of one core. Lives as long as the core.

    Enforces ``max_pool_size`` over the processes of every group together. Routes a request to its
    group; with one app, every request goes to it.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.max_pool_size: int = settings["max_pool_size"]
        self.groups: list[Group] = []
        # The groups requests without connector fields are routed among (find_group): those
        # the core was started with, not those connectors added.
        self._routable: list[Group] = []
        self._single: Group | None = None
        # Groups with requests waiting and no process, for which no other app's process was idle
        # to evict when they needed room: they try again when one becomes idle.
        self.starved: set[Group] = set()
        self.stopping = False
        # Called whenever processes become ready, fail to start or exit; the core waits on it.
        self.changed: Callable[[], None] = lambda: None
        # The access log, when one is configured (the core opens it).
        self.access_log: AccessLog | None = None
        # Publishes an event (control protocol); the core connects it to its control server.
        self.emit: Callable[..., None] = lambda event, **fields: None

    def add_group(self, group: Group, routable: bool = True) -> None:
        self.groups.append(group)
        if not routable:
            return
        self._routable.append(group)
        # One app with neither server names nor a base URI takes every request, unrouted.
        only = self._routable[0]
        simple = len(self._routable) == 1 and not only.host_names and not only.base_uri
        self._single = only if simple else None

    def remove_group(self, group: Group) -> None:
        """Forget a retired group whose processes have all exited."""
        if group in self.groups:
            self.groups.remove(group)
        self.changed()

    def find_group(self, request: Request) -> Group | None:
        """The app a request is for: the most specific match of Host (server_names) and path
        (base_uri); None when no app matches."""
        if self._single is not None:
            return self._single
        host = _host_name(request.host)
        path = request.path
        if path.startswith((b"http://", b"https://")):
            # absolute-form request target: the path starts after the authority
            slash = path.find(b"/", path.find(b"//") + 2)
            path = path[slash:] if slash >= 0 else b"/"
        best: Group | None = None
        for group in self._routable:
            if not group.matches(host, path):
                continue
            if best is None or (bool(group.host_names), len(group.base_uri)) > (
                bool(best.host_names),
                len(best.base_uri),
            ):
                best = group
        return best

    def takes_every_request(self, group: Group) -> bool:
        """Does ``group`` get every request the listeners receive (the one app, routed by
        neither host nor path)? Only then may a whole connection go to one of its processes:
        otherwise a later request on it could be another app's."""
        return self._single is group

    def keep_alive(self, request: Request) -> bool:
        """May the connection stay open after this request's response?"""
        return request.keep_alive and not self.stopping

    def process_count(self) -> int:
        return sum(g.live_count() for g in self.groups)

    def has_room(self) -> bool:
        return self.process_count() < self.max_pool_size

    def log_access(
        self, conn: Connection, head: bytes, status: int | None, size: int | None
    ) -> None:
        """One access log line, when the access log is on."""
        if self.access_log is not None:
            remote = conn.meta.split(b" ", 1)[0].decode()
            self.access_log.record(remote, head, status, size)

    def log_access_line(
        self,
        conn: Connection,
        request_line: str,
        status: int | None,
        size: int | None,
        referer: str | None,
        agent: str | None,
    ) -> None:
        """One access log line from its parts (a Node process reports them), when the access
        log is on."""
        if self.access_log is not None:
            remote = conn.meta.split(b" ", 1)[0].decode()
            self.access_log.record_line(remote, request_line, status, size, referer, agent)

    def evict_for(self, group: Group) -> None:
        """``group`` has no process and the pool is full: stop the longest-idle process of
        another app to make room (it is replaced once it exits)."""
        candidates = [
            p for g in self.groups if g is not group for p in [g.idlest()] if p is not None
        ]
        if not candidates:
            # Every process is busy (or its last request's D is still on its way): the group
            # tries again once one is idle (on_process_idle).
            self.starved.add(group)
            return
        self.starved.discard(group)
        victim = min(candidates, key=lambda p: p.last_used)
        victim.retire(f"making room for app {group.name} (max_pool_size)")

    def on_process_idle(self) -> None:
        """A process finished its last request while groups wait for room: evict it for them."""
        for group in list(self.starved):
            self.starved.discard(group)
            if group.wait_list and not self.stopping:
                group.replace_soon()

    def on_process_ready(self, group: Group) -> None:
        self.changed()

    def on_spawn_failed(self, group: Group) -> None:
        self.changed()

    def on_process_exited(self, group: Group) -> None:
        """Room freed in the pool: a group waiting for room may grow."""
        self.changed()
        if self.stopping:
            return
        for other in self.groups:
            if other.wait_list:
                other.replace_soon()
            elif other is not group:
                other.ensure_min_instances()

    def start(self) -> None:
        for group in self.groups:
            group.ensure_min_instances()

    def stop(self) -> None:
        self.stopping = True
        for group in self.groups:
            group.stop()

    def busy(self) -> bool:
        return any(g.busy() for g in self.groups)

    def all_exited(self) -> bool:
        return all(g.live_count() == 0 for g in self.groups)

    def verify_invariants(self) -> None:
        assert self.process_count() <= self.max_pool_size or self.stopping
        for group in self.groups:
            group.verify_invariants()


def _host_name(host: bytes) -> bytes:
    """The Host header's name, lowercase, without the port (IPv6 literals keep their brackets)."""
    host = host.strip().lower()
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] if end > 0 else host
    return host.split(b":", 1)[0]
