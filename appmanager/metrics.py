"""Metrics and health: ``/metrics`` in the Prometheus text format and ``/healthz``.

Served on ``--metrics-address HOST:PORT`` by a small HTTP server of its own, apart from the
apps' traffic, for as long as the core runs. Counters are kept per Group by ``AppMetrics``;
gauges are read from the Pool when scraped.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from typing import TYPE_CHECKING

import psutil

from appmanager.states import ProcessState

if TYPE_CHECKING:
    from appmanager.core import Core
    from appmanager.group import Group

log = logging.getLogger("appmanager")

# Seconds; the last bucket (+Inf) is implied.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AppMetrics:
    """Counters of one app, since the core started."""

    __slots__ = ("requests", "spawn_failures", "overflows", "buckets", "latency_sum")

    def __init__(self) -> None:
        self.requests = 0
        self.spawn_failures = 0
        self.overflows = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def observe(self, seconds: float) -> None:
        """One request answered by an app process, in ``seconds`` from handoff to done."""
        self.requests += 1
        self.latency_sum += seconds
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(core: Core) -> str:
    """The whole ``/metrics`` page."""
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP appmanager_{name} {help_text}")
        out.append(f"# TYPE appmanager_{name} {kind}")

    groups = core.pool.groups
    family("requests_total", "counter", "Requests answered by the app's processes.")
    for g in groups:
        out.append(f'appmanager_requests_total{{app="{_label(g.name)}"}} {g.metrics.requests}')
    family("request_queue_length", "gauge", "Requests waiting for a process of the app.")
    for g in groups:
        out.append(f'appmanager_request_queue_length{{app="{_label(g.name)}"}} {len(g.wait_list)}')
    family("request_queue_overflows_total", "counter", "Requests answered 503: queue full.")
    for g in groups:
        line = f'appmanager_request_queue_overflows_total{{app="{_label(g.name)}"}}'
        out.append(f"{line} {g.metrics.overflows}")
    family("processes", "gauge", "The app's processes, by state.")
    for g in groups:
        counts = {state: 0 for state in ("SPAWNING", "READY", "STOPPING")}
        counts["SPAWNING"] = g.spawning
        for p in g.processes:
            if p.state is not ProcessState.EXITED:
                counts[p.state.name] = counts.get(p.state.name, 0) + 1
        for state, count in counts.items():
            out.append(f'appmanager_processes{{app="{_label(g.name)}",state="{state}"}} {count}')
    family("spawn_failures_total", "counter", "Processes of the app that failed to start.")
    for g in groups:
        line = f'appmanager_spawn_failures_total{{app="{_label(g.name)}"}}'
        out.append(f"{line} {g.metrics.spawn_failures}")
    family("request_duration_seconds", "histogram", "Time from handoff to response done.")
    for g in groups:
        _histogram(out, g)
    family("process_resident_memory_bytes", "gauge", "Resident memory (RSS) of each process.")
    memory_lines, cpu_lines, private_lines = [], [], []
    for g in groups:
        for p in g.processes:
            if p.state is ProcessState.EXITED:
                continue
            labels = f'app="{_label(g.name)}",pid="{p.pid}"'
            try:
                handle = psutil.Process(p.pid)
                mem = handle.memory_full_info()
                times = handle.cpu_times()
            except (psutil.Error, OSError):
                continue
            memory_lines.append(f"appmanager_process_resident_memory_bytes{{{labels}}} {mem.rss}")
            private_lines.append(
                f"appmanager_process_private_memory_bytes{{{labels}}} {getattr(mem, 'uss', 0)}"
            )
            cpu_lines.append(
                f"appmanager_process_cpu_seconds_total{{{labels}}} {times.user + times.system:.3f}"
            )
    out += memory_lines
    family("process_private_memory_bytes", "gauge", "Private memory (USS) of each process.")
    out += private_lines
    family("process_cpu_seconds_total", "counter", "CPU time each process has used.")
    out += cpu_lines
    return "\n".join(out) + "\n"


def _histogram(out: list[str], group: Group) -> None:
    app = _label(group.name)
    metrics = group.metrics
    cumulative = 0
    for bound, count in zip(LATENCY_BUCKETS, metrics.buckets, strict=False):
        cumulative += count
        out.append(
            f'appmanager_request_duration_seconds_bucket{{app="{app}",le="{bound}"}} {cumulative}'
        )
    cumulative += metrics.buckets[-1]
    out.append(f'appmanager_request_duration_seconds_bucket{{app="{app}",le="+Inf"}} {cumulative}')
    out.append(f'appmanager_request_duration_seconds_sum{{app="{app}"}} {metrics.latency_sum:.6f}')
    out.append(f'appmanager_request_duration_seconds_count{{app="{app}"}} {cumulative}')


class MetricsServer:
    """The HTTP server for /metrics and /healthz; lives as long as the core."""

    def __init__(self, core: Core, address: str) -> None:
        self.core = core
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]") or "127.0.0.1"
        self.port = int(port)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            path = parts[1].split(b"?", 1)[0] if len(parts) == 3 else b""
            if len(parts) != 3:
                status, body, ctype = 400, "bad request\n", "text/plain"
            elif path == b"/metrics":
                status, body = 200, render(self.core)
                ctype = "text/plain; version=0.0.4; charset=utf-8"
            elif path == b"/healthz":
                ready = self.core.ready
                status, body = (200, "ready\n") if ready else (503, "not ready\n")
                ctype = "text/plain"
            else:
                status, body, ctype = 404, "not found\n", "text/plain"
            data = body.encode()
            reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}
            writer.write(
                f"HTTP/1.1 {status} {reason[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + (b"" if parts[0] == b"HEAD" else data)
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
