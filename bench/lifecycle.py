#!/usr/bin/env python3
"""Process lifecycle: what one more app process costs, and how fast a burst is absorbed.

appmanager (`--spawn-method smart` and `--spawn-method direct`) and Passenger standalone (its
default spawn method) side by side, each started with `--min-instances 1 --max-pool-size 8`:

1. **One more process** (Django, tests/apps/django_project; Rails, tests/apps/rails_app; both
   copied to a temp dir behind a small hold endpoint, see bench/apps/hold/): requests that stay
   busy until released make the server grow from 1 to 4 processes, one at a time. Per extra
   process: the spawn time the server itself records (appmanager's log, Passenger's
   `passenger-status --show=xml`), the time from the request that needed it to that request
   arriving in it, and its PSS and USS (psutil `memory_full_info`) after it has served 20 requests;
   the preloader, where there is one, is reported on its own.
2. **Burst** (bench/apps/slow_wsgi, bench/apps/slow_rack: every request takes 0.5 s): 8 clients
   at once against 1 process; the time until all 8 are answered.

    python3 bench/lifecycle.py [--rounds 3] [--peers ...] [--parts growth,burst] [--apps ...]
    python3 bench/lifecycle.py --appmanager-rev HEAD --write-docs

Every server is started afresh for every run, on a free loopback port, and stopped after it
(also on Ctrl-C, SIGTERM or error); the runs alternate between the servers. A server that fails
to start is reported as FAILED; the others still run. Exit status: 0 when every server produced
figures, 1 when one failed.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
from chart import FOOTER_H, HEADER_H, PANEL_H, PANEL_W, Bar, Panel, _text, render_panel
from harness import (
    BENCH_DIR,
    DOCS_MD,
    Terminated,
    appmanager_cmd,
    checkout_snapshot,
    resolve_rev,
    stop_all,
    version,
)
from peers import (
    START_TIMEOUT_S,
    AppManagerPeer,
    PassengerPeer,
    PeerStartError,
    descendants,
    http_get,
    repo_root,
    tail,
)

SLUG = "lifecycle"
TITLE = "Process lifecycle: one more process, and a burst"
BEGIN_MARK, END_MARK = f"<!-- {SLUG}:begin -->", f"<!-- {SLUG}:end -->"
DOCS_SVG = repo_root() / "docs" / f"benchmarks-{SLUG}.svg"
MIN_INSTANCES = 1
MAX_POOL_SIZE = 8
GROW_TO = 4  # processes: the first one, then 3 extra
BURST_CLIENTS = 8
SLOW_REQUEST_S = 0.5
HOLD_PATH = "/__bench/hold"
HOLD_FILE = "bench-hold"
ARRIVALS_DIR = "bench-arrivals"
STEP_TIMEOUT_S = 60.0  # for one extra process to arrive and warm up
MIB = 1024 * 1024
#: The target of the issue for smart spawning.
TARGET_USS_RATIO = 0.40
TARGET_SPAWN_MS = 100.0
TARGET_TEXT = (
    "an extra smart-spawned Django process adds < 40% of a direct one's private memory (USS) "
    "and spawns in < 100 ms"
)


class RunError(RuntimeError):
    """One measured run went wrong (the server still gets stopped)."""


# --------------------------------------------------------------------------------------- apps


@dataclass(frozen=True)
class AppSetup:
    """One app of the benchmark: how to lay it out in a temp dir and how to start it."""

    key: str  # "django"
    label: str  # "Django"
    language: str  # "python" or "ruby"
    #: Part of the body of `GET /` once the app serves.
    ready_text: bytes
    #: Fills an empty directory with the app.
    prepare: Callable[[Path], None]
    #: The startup file, for apps that are not found by their file name alone.
    startup_file: str | None = None


def _copy_tree(source: Path, dest: Path) -> None:
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _prepare_django(dest: Path) -> None:
    """tests/apps/django_project with bench/apps/hold/hold_wsgi.py as its startup file."""
    _copy_tree(repo_root() / "tests" / "apps" / "django_project", dest)
    shutil.copy(BENCH_DIR / "apps" / "hold" / "hold_wsgi.py", dest / "hold_wsgi.py")


def _prepare_rails(dest: Path) -> None:
    """tests/apps/rails_app's config.ru with the BenchHold middleware in front."""
    dest.mkdir(parents=True)
    shutil.copy(BENCH_DIR / "apps" / "hold" / "bench_hold.rb", dest / "bench_hold.rb")
    original = (repo_root() / "tests" / "apps" / "rails_app" / "config.ru").read_text()
    prefix = (
        "# bench/lifecycle.py: the hold endpoint (bench_hold.rb) in front of the test app below.\n"
        'require_relative "bench_hold"\nuse BenchHold\n\n'
    )
    (dest / "config.ru").write_text(prefix + original)


def _prepare_slow_wsgi(dest: Path) -> None:
    _copy_tree(BENCH_DIR / "apps" / "slow_wsgi", dest)


def _prepare_slow_rack(dest: Path) -> None:
    _copy_tree(BENCH_DIR / "apps" / "slow_rack", dest)


GROWTH_APPS = {
    "django": AppSetup(
        "django", "Django", "python", b"Hello from Django", _prepare_django, "hold_wsgi.py"
    ),
    "rails": AppSetup("rails", "Rails", "ruby", b"Hello from Rails", _prepare_rails),
}
BURST_APPS = {
    "wsgi": AppSetup(
        "wsgi", "WSGI", "python", b"Hello, world!", _prepare_slow_wsgi, "slow_wsgi.py"
    ),
    "rack": AppSetup("rack", "Rack", "ruby", b"Hello, world!", _prepare_slow_rack),
}


# -------------------------------------------------------------------------------------- peers


@dataclass(frozen=True)
class Variant:
    """One server configuration: appmanager smart, appmanager direct, Passenger."""

    key: str
    label: str
    color: str
    short: str  # in the names of the temp dirs


VARIANTS = (
    Variant("appmanager-smart", "appmanager smart", "#2b6cb0", "s"),
    Variant("appmanager-direct", "appmanager direct", "#90cdf4", "d"),
    Variant("passenger", "Passenger", "#dd6b20", "p"),
)
VARIANT_BY_KEY = {v.key: v for v in VARIANTS}


def _set_option(cmd: list[str], option: str, value: str) -> list[str]:
    """`cmd` with `option`'s value replaced (or the option appended)."""
    cmd = list(cmd)
    if option in cmd:
        cmd[cmd.index(option) + 1] = value
    else:
        cmd += [option, value]
    return cmd


def _wait_serving(peer: AppManagerPeer | PassengerPeer, text: bytes, timeout: float) -> None:
    """Poll `GET /` until it answers 200 with `text` in the body, or raise PeerStartError."""
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if not peer.is_alive():
            raise PeerStartError(peer._failure(f"exited during start{peer._exit_note()}"))
        try:
            status, body = http_get(peer.host, peer.port, timeout=5.0)
            if status == 200 and text in body:
                return
            last_error = f"HTTP {status} with body {body[:80]!r}"
        except OSError as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise PeerStartError(
        peer._failure(f"did not serve {peer.url} within {timeout:.0f} s ({last_error})")
    )


def _memory(pid: int) -> dict[str, int] | None:
    """RSS, PSS and USS of one process in bytes (None when it is gone)."""
    try:
        info = psutil.Process(pid).memory_full_info()
    except psutil.Error:
        return None
    return {"rss": int(info.rss), "pss": int(info.pss), "uss": int(info.uss)}


def _parent(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).ppid())
    except psutil.Error:
        return None


# `2026-11-21 01:26:34.862 [appmanager 2498] INFO process 2665 forked by preloader 2541 in 2 ms`
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \[appmanager \d+\] \w+ (.*)$")
SPAWNED = re.compile(r"^process (\d+) spawned for app ")
FORKED = re.compile(r"^process (\d+) forked by preloader \d+ in (\d+) ms")
ENTERED_READY = re.compile(r"^process (\d+) entered READY$")


#: A spawn: (start, end) in seconds since the epoch.
Interval = tuple[float, float]


def spawn_intervals_from_log(text: str) -> dict[int, Interval]:
    """When each process was spawned, from appmanager's log: a forked process from FORK sent to
    its READY (the `forked by preloader ... in N ms` line, logged at READY), any other from
    `spawned` (posix_spawn) to `entered READY`. The log has whole milliseconds."""
    spawned: dict[int, float] = {}
    ready: dict[int, float] = {}
    forked: dict[int, float] = {}
    for line in text.splitlines():
        match = LOG_LINE.match(line)
        if match is None:
            continue
        stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        message = match.group(2)
        if m := FORKED.match(message):
            forked[int(m.group(1))] = float(m.group(2)) / 1000
            ready.setdefault(int(m.group(1)), stamp)
        elif m := SPAWNED.match(message):
            spawned[int(m.group(1))] = stamp
        elif m := ENTERED_READY.match(message):
            ready.setdefault(int(m.group(1)), stamp)
    intervals = {pid: (t, ready[pid]) for pid, t in spawned.items() if pid in ready}
    intervals.update({pid: (ready[pid] - took, ready[pid]) for pid, took in forked.items()})
    return intervals


def spawn_ms(interval: Interval | None) -> float | None:
    """The length of a spawn in ms."""
    return None if interval is None else round((interval[1] - interval[0]) * 1000, 3)


def most_at_once(intervals: Sequence[Interval]) -> int:
    """The most intervals that overlap at one moment."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = current = 0
    for _, change in events:  # at a tie an end (-1) sorts before a start (+1)
        current += change
        most = max(most, current)
    return most


class LifecycleAppManager(AppManagerPeer):
    """appmanager with 1 to 8 processes and a given spawn method."""

    def __init__(
        self,
        app: AppSetup,
        app_dir: Path,
        work_dir: Path,
        base_cmd: list[str],
        method: str,
        extra_args: Sequence[str],
    ) -> None:
        self.name = f"appmanager-{method}"
        super().__init__(app_dir, work_dir, base_cmd, extra_args, note=f"--spawn-method {method}")
        self.app = app
        self.method = method

    def command(self) -> list[str]:
        """`appmanager start ... --min-instances 1 --max-pool-size 8 --spawn-method M`."""
        cmd = _set_option(super().command(), "--min-instances", str(MIN_INSTANCES))
        cmd = _set_option(cmd, "--max-pool-size", str(MAX_POOL_SIZE))
        cmd = _set_option(cmd, "--spawn-method", self.method)
        if self.app.startup_file:
            cmd = _set_option(cmd, "--startup-file", self.app.startup_file)
        return cmd

    def _wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        _wait_serving(self, self.app.ready_text, timeout)

    def status(self) -> dict[str, Any]:
        """`appmanager status --json` of this instance."""
        result = subprocess.run(
            [*self.base_cmd, "status", "--json", "--instance-dir", str(self.instance_dir)],
            cwd=self.work_dir,
            env=self.spawn_env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise RunError(f"appmanager status failed: {(result.stderr or result.stdout).strip()}")
        status: dict[str, Any] = json.loads(result.stdout)
        return status

    def _app_status(self) -> dict[str, Any]:
        apps: list[dict[str, Any]] = self.status()["apps"]
        if len(apps) != 1:
            raise RunError(f"appmanager status lists {len(apps)} apps, not 1")
        return apps[0]

    def app_pids(self) -> list[int]:
        """The app processes (not the preloader)."""
        return [int(p["pid"]) for p in self._app_status()["processes"]]

    def preloader_pid(self) -> int | None:
        """The app's preloader, if it has one now."""
        preloader = self._app_status().get("preloader")
        return int(preloader["pid"]) if preloader else None

    def spawn_intervals(self) -> dict[int, Interval]:
        """When each process was spawned, from the core's log."""
        try:
            return spawn_intervals_from_log(self.log_path.read_text(errors="replace"))
        except OSError:
            return {}

    def core_pids(self) -> set[int]:
        """The core: the process this script started."""
        pid = self.main_pid()
        return set() if pid is None else {pid}


class LifecyclePassenger(PassengerPeer):
    """Passenger standalone (builtin engine) with 1 to 8 processes and its default spawn method."""

    def __init__(
        self, app: AppSetup, app_dir: Path, work_dir: Path, interpreter_args: Sequence[str]
    ) -> None:
        super().__init__(app_dir, work_dir, interpreter_args, note="default spawn method")
        self.app = app

    def command(self) -> list[str]:
        """`passenger start --engine=builtin ... --min-instances 1 --max-pool-size 8`."""
        cmd = _set_option(super().command(), "--min-instances", str(MIN_INSTANCES))
        cmd = _set_option(cmd, "--max-pool-size", str(MAX_POOL_SIZE))
        if self.app.startup_file:
            cmd = _set_option(cmd, "--app-type", "wsgi")
            cmd = _set_option(cmd, "--startup-file", self.app.startup_file)
        return cmd

    def _wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        _wait_serving(self, self.app.ready_text, timeout)

    def status_xml(self) -> ET.Element:
        """`passenger-status --show=xml` of this instance, parsed."""
        env = dict(os.environ, PASSENGER_INSTANCE_REGISTRY_DIR=str(self.registry_dir))
        result = subprocess.run(
            ["passenger-status", "--show=xml"],
            env=env,
            capture_output=True,
            timeout=30,
            check=False,
        )
        out = result.stdout
        begin, end = out.find(b"<?xml"), out.rfind(b"</info>")
        if result.returncode != 0 or begin == -1 or end == -1:
            raise RunError(f"passenger-status failed: {(result.stderr or out).decode()[-300:]}")
        return ET.fromstring(out[begin : end + len(b"</info>")])

    def _processes(self) -> list[ET.Element]:
        return list(self.status_xml().iter("process"))

    def app_pids(self) -> list[int]:
        """The app processes passenger-status lists."""
        return [int(p.findtext("pid") or 0) for p in self._processes()]

    def preloader_pid(self) -> int | None:
        """The 'Passenger AppPreloader' process under the watchdog, if there is one."""
        pid = self.watchdog_pid()
        for proc in descendants(pid) if pid is not None else []:
            with contextlib.suppress(psutil.Error):
                if " ".join(proc.cmdline()).startswith("Passenger AppPreloader"):
                    return proc.pid
        return None

    def spawn_intervals(self) -> dict[int, Interval]:
        """spawn_start_time to spawn_end_time per process, from passenger-status (µs)."""
        intervals = {}
        for proc in self._processes():
            start, end = proc.findtext("spawn_start_time"), proc.findtext("spawn_end_time")
            if start and end:
                intervals[int(proc.findtext("pid") or 0)] = (int(start) / 1e6, int(end) / 1e6)
        return intervals

    def core_pids(self) -> set[int]:
        """The 'Passenger core' process(es)."""
        return {p.pid for p in self.core_processes()}

    def configured_spawn_method(self) -> str:
        """The spawn method passenger-status says the app's options ask for."""
        return self.status_xml().findtext(".//group/options/spawn_method") or "?"


LifecyclePeer = LifecycleAppManager | LifecyclePassenger


def make_peer(
    variant: Variant, app: AppSetup, app_dir: Path, work_dir: Path, args: argparse.Namespace
) -> LifecyclePeer:
    """A fresh, unstarted server for one run."""
    interpreter = ["--python", args.python] if app.language == "python" else ["--ruby", args.ruby]
    if variant.key == "passenger":
        return LifecyclePassenger(app, app_dir, work_dir, interpreter)
    method = variant.key.removeprefix("appmanager-")
    return LifecycleAppManager(app, app_dir, work_dir, appmanager_cmd(args), method, interpreter)


def process_count(peer: LifecyclePeer) -> int:
    """How many app processes the server has now."""
    return len(peer.app_pids())


# ------------------------------------------------------------------------------------ results


@dataclass
class GrowthRun:
    """One run of a server growing from 1 to 4 processes."""

    round: int
    ok: bool = False
    error: str = ""
    pids: list[int] = field(default_factory=list)  # in the order they came
    #: Per extra process: the server's own spawn time (None when it recorded none).
    spawn_ms: list[float | None] = field(default_factory=list)
    #: Per extra process: the request that needed it sent → that request arriving in it.
    serve_ms: list[float] = field(default_factory=list)
    #: Per process (the first one too), after all 4 were up: rss, pss, uss in bytes.
    memory: list[dict[str, int]] = field(default_factory=list)
    preloader_pid: int | None = None
    preloader_memory: dict[str, int] | None = None
    #: PSS of the whole app (its processes + preloader) with 1, 2, 3, 4 processes.
    total_pss: list[int] = field(default_factory=list)
    #: "smart" (the processes are children of a preloader) or "direct".
    observed_method: str = ""
    #: Passenger only: the spawn method its options name.
    configured_method: str = ""


@dataclass
class BurstRun:
    """One burst of 8 clients against a server with 1 process."""

    round: int
    ok: bool = False
    error: str = ""
    total_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    processes_before: int = 0
    processes_after: int = 0
    #: Processes spawned for the burst (until right after it), and the most spawning at once.
    spawns: int = 0
    spawns_at_once: int = 0


@dataclass
class Series:
    """Every run of one server on one app."""

    part: str  # "growth" or "burst"
    app: str
    variant: str
    command: str = ""
    status: str = "ok"  # "ok" or "failed"
    error: str = ""
    growth: list[GrowthRun] = field(default_factory=list)
    burst: list[BurstRun] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Whether the server never produced figures."""
        return self.status != "ok"


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def growth_summary(series: Series) -> dict[str, Any]:
    """Medians over the valid runs (per extra process for the per-process figures)."""
    runs = [r for r in series.growth if r.ok]
    extra = [m for r in runs for m in r.memory[1:]]
    per_extra = [
        (r.total_pss[-1] - r.total_pss[0]) / (len(r.total_pss) - 1)
        for r in runs
        if len(r.total_pss) > 1
    ]
    preloaders = [r.preloader_memory for r in runs if r.preloader_memory]
    methods = sorted({r.observed_method for r in runs})
    return {
        "spawn_ms": _median([x for r in runs for x in r.spawn_ms]),
        "serve_ms": _median([x for r in runs for x in r.serve_ms]),
        "uss": _median([m["uss"] for m in extra]),
        "pss": _median([m["pss"] for m in extra]),
        "rss": _median([m["rss"] for m in extra]),
        "app_pss_per_extra": _median(per_extra),
        "preloader_pss": _median([m["pss"] for m in preloaders]),
        "preloader_uss": _median([m["uss"] for m in preloaders]),
        "observed_method": "/".join(methods),
        "configured_method": "/".join(sorted({r.configured_method for r in runs} - {""})),
        "valid_runs": len(runs),
    }


def burst_summary(series: Series) -> dict[str, Any]:
    """Medians over the valid bursts."""
    runs = [r for r in series.burst if r.ok]
    return {
        "total_s": _median([r.total_s for r in runs]),
        "min_s": min((r.total_s for r in runs), default=None),
        "max_s": max((r.total_s for r in runs), default=None),
        "processes": _median([len(set(r.pids)) for r in runs]),
        "processes_after": _median([r.processes_after for r in runs]),
        "spawns_at_once": _median([r.spawns_at_once for r in runs]),
        "valid_runs": len(runs),
    }


# ------------------------------------------------------------------------------- growth runs


class HoldClient(threading.Thread):
    """One `GET /__bench/hold` on its own connection, in a thread (it returns when released)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        self.host, self.port = host, port
        self.sent = 0.0
        self.status: int | None = None
        self.body = b""
        self.error = ""

    def run(self) -> None:
        """Send the request and wait for the answer (at most 180 s)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=180)
        try:
            self.sent = time.time()
            conn.request("GET", HOLD_PATH)
            response = conn.getresponse()
            self.status, self.body = response.status, response.read()
        except OSError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()


def _marks(arrivals: Path, kind: str) -> dict[int, float]:
    """pid → time of the marks of one kind the app processes wrote."""
    marks = {}
    for path in arrivals.glob(f"*.{kind}"):
        with contextlib.suppress(OSError, ValueError):
            marks[int(path.name.split(".")[0])] = float(path.read_text())
    return marks


def _wait_for(what: str, check: Callable[[], int | None], peer: LifecyclePeer) -> int:
    """Poll `check` until it returns a pid; RunError after STEP_TIMEOUT_S or if the server died."""
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while time.monotonic() < deadline:
        found = check()
        if found is not None:
            return found
        if not peer.is_alive():
            raise RunError(f"the server died while waiting for {what}")
        time.sleep(0.005)
    raise RunError(f"no {what} within {STEP_TIMEOUT_S:.0f} s")


def _total_pss(pids: Sequence[int]) -> int:
    return sum(m["pss"] for pid in pids if (m := _memory(pid)) is not None)


def grow(peer: LifecyclePeer, app_dir: Path, run: GrowthRun) -> None:
    """Make the started server grow from 1 to GROW_TO processes, one at a time, and measure."""
    arrivals, hold = app_dir / ARRIVALS_DIR, app_dir / HOLD_FILE
    shutil.rmtree(arrivals, ignore_errors=True)
    arrivals.mkdir()
    hold.touch()
    clients: list[HoldClient] = []
    try:
        preloader: int | None = None
        for step in range(1, GROW_TO + 1):
            client = HoldClient(peer.host, peer.port)
            clients.append(client)
            client.start()
            known = set(run.pids)

            def new_arrival(known: set[int] = known) -> int | None:
                return next((p for p in _marks(arrivals, "arrived") if p not in known), None)

            pid = _wait_for(f"process number {step} to take a request", new_arrival, peer)

            def warmed(pid: int = pid) -> int | None:
                return pid if pid in _marks(arrivals, "warmed") else None

            _wait_for(f"process {pid} to warm up", warmed, peer)
            run.pids.append(pid)
            if step > 1:
                run.serve_ms.append((_marks(arrivals, "arrived")[pid] - client.sent) * 1000)
            if step == 1:
                preloader = peer.preloader_pid()
            run.total_pss.append(_total_pss([*run.pids, *([preloader] if preloader else [])]))
        listed = sorted(peer.app_pids())
        if listed != sorted(run.pids):
            raise RunError(f"the server lists processes {listed}, the hold requests saw {run.pids}")
        for pid in run.pids:
            memory = _memory(pid)
            if memory is None:
                raise RunError(f"process {pid} vanished before its memory was measured")
            run.memory.append(memory)
        run.preloader_pid = peer.preloader_pid()
        if run.preloader_pid is not None:
            run.preloader_memory = _memory(run.preloader_pid)
        parents = {_parent(pid) for pid in run.pids}
        cores = peer.core_pids()
        if run.preloader_pid is not None and parents == {run.preloader_pid}:
            run.observed_method = "smart"
        elif run.preloader_pid is None and cores and parents <= cores:
            run.observed_method = "direct"
        else:
            run.observed_method = (
                f"other (parents {sorted(p or 0 for p in parents)}, core {sorted(cores)}, "
                f"preloader {run.preloader_pid})"
            )
        intervals = peer.spawn_intervals()
        run.spawn_ms = [spawn_ms(intervals.get(pid)) for pid in run.pids[1:]]
        if isinstance(peer, LifecyclePassenger):
            run.configured_method = peer.configured_spawn_method()
    finally:
        hold.unlink(missing_ok=True)
        for client in clients:
            client.join(timeout=30)
    answers = sorted(int(c.body) for c in clients if c.status == 200 and c.body.strip().isdigit())
    if answers != sorted(run.pids):
        errors = "; ".join(c.error for c in clients if c.error)
        raise RunError(f"the hold requests answered {answers}, expected {run.pids} {errors}")
    run.ok = True


# -------------------------------------------------------------------------------- burst runs


def burst(peer: LifecyclePeer, run: BurstRun) -> None:
    """BURST_CLIENTS requests at once, each on its own connection; the time until all answered."""
    before = set(peer.app_pids())
    run.processes_before = len(before)
    if run.processes_before != MIN_INSTANCES:
        raise RunError(f"{run.processes_before} processes before the burst, not {MIN_INSTANCES}")
    barrier = threading.Barrier(BURST_CLIENTS + 1, timeout=30)
    ends: list[float | None] = [None] * BURST_CLIENTS
    pids: list[int | None] = [None] * BURST_CLIENTS
    errors: list[str] = []

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(peer.host, peer.port, timeout=60)
        try:
            barrier.wait()
            conn.request("GET", "/")
            response = conn.getresponse()
            body = response.read()
            ends[i] = time.monotonic()
            if response.status != 200 or not body.startswith(b"Hello, world!"):
                errors.append(f"HTTP {response.status} {body[:60]!r}")
            pid = response.getheader("X-Pid")
            pids[i] = int(pid) if pid and pid.isdigit() else None
        except (OSError, threading.BrokenBarrierError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()

    threads = [
        threading.Thread(target=client, args=(i,), daemon=True) for i in range(BURST_CLIENTS)
    ]
    for thread in threads:
        thread.start()
    barrier.wait()
    began = time.monotonic()
    for thread in threads:
        thread.join(timeout=90)
    if errors or any(end is None for end in ends):
        raise RunError(f"burst: {len(errors)} requests failed: {'; '.join(errors[:3])}")
    run.latencies_s = [round(end - began, 4) for end in ends if end is not None]
    run.total_s = max(run.latencies_s)
    run.pids = [pid for pid in pids if pid is not None]
    run.processes_after = process_count(peer)
    spawned = [iv for pid, iv in peer.spawn_intervals().items() if pid not in before]
    run.spawns, run.spawns_at_once = len(spawned), most_at_once(spawned)
    run.ok = True


# ---------------------------------------------------------------------------------- running


def run_series(
    part: str,
    apps: Sequence[AppSetup],
    variants: Sequence[Variant],
    args: argparse.Namespace,
    work: Path,
) -> list[Series]:
    """Every round of every server on every app of one part, alternating between the servers."""
    all_series: list[Series] = []
    for app in apps:
        series = {v.key: Series(part, app.key, v.key) for v in variants}
        app_dirs = {}
        for variant in variants:
            app_dirs[variant.key] = work / f"{app.key}-{variant.short}"
            app.prepare(app_dirs[variant.key])
        for round_no in range(1, args.rounds + 1):
            for variant in variants:
                current = series[variant.key]
                if current.failed:
                    continue
                # Short: Unix socket paths (Passenger's, appmanager's) must fit in 107 bytes.
                run_dir = work / f"{app.key}{round_no}{variant.short}"
                peer = make_peer(variant, app, app_dirs[variant.key], run_dir, args)
                one_run(part, app, variant, peer, current, round_no)
        for current in series.values():
            runs: Sequence[GrowthRun | BurstRun] = (
                current.growth if part == "growth" else current.burst
            )
            if not current.failed and not any(r.ok for r in runs):
                current.status = "failed"
                current.error = next((r.error for r in runs if r.error), "no valid run")
        all_series += series.values()
    return all_series


def one_run(
    part: str, app: AppSetup, variant: Variant, peer: LifecyclePeer, series: Series, round_no: int
) -> None:
    """Start the server, measure one run, always stop it; print one line."""
    label = f"  {part} {app.key:<6} round {round_no} {variant.label:<17}"
    series.command = peer.describe_command()
    try:
        try:
            peer.start()
        except PeerStartError as exc:
            series.status, series.error = "failed", str(exc)
            print(f"{label} FAILED to start: {str(exc).splitlines()[0]}", flush=True)
            return
        if part == "growth":
            growth = GrowthRun(round_no)
            series.growth.append(growth)
            try:
                grow(peer, peer.app_dir, growth)
            except (RunError, OSError, psutil.Error, ET.ParseError) as exc:
                growth.error = f"{exc}\n{tail(peer.log_path)}"
            print(label + _growth_line(growth), flush=True)
        else:
            run = BurstRun(round_no)
            series.burst.append(run)
            time.sleep(0.5)  # let the readiness request's process go idle
            try:
                burst(peer, run)
            except (RunError, OSError, psutil.Error, ET.ParseError) as exc:
                run.error = f"{exc}\n{tail(peer.log_path)}"
            print(label + _burst_line(run), flush=True)
    finally:
        stop_all([peer])


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f} ms" if value >= 10 or value == round(value) else f"{value:.1f} ms"


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value / MIB:.1f} MiB"


def _growth_line(run: GrowthRun) -> str:
    if not run.ok:
        return f" INVALID: {run.error.splitlines()[0] if run.error else '?'}"
    spawn = ", ".join(_ms(x) for x in run.spawn_ms)
    uss = ", ".join(f"{m['uss'] / MIB:.1f}" for m in run.memory[1:])
    pss = ", ".join(f"{m['pss'] / MIB:.1f}" for m in run.memory[1:])
    return f" spawn {spawn}; USS {uss} MiB; PSS {pss} MiB; {run.observed_method}" + (
        f" (preloader {run.preloader_pid})" if run.preloader_pid else ""
    )


def _burst_line(run: BurstRun) -> str:
    if not run.ok:
        return f" INVALID: {run.error.splitlines()[0] if run.error else '?'}"
    return (
        f" all {BURST_CLIENTS} served in {run.total_s:.3f} s by {len(set(run.pids))} processes "
        f"({run.processes_after} after; {run.spawns} spawns, at most {run.spawns_at_once} at once)"
    )


# ---------------------------------------------------------------------------------- compare


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def compare(series: list[Series]) -> dict[str, Any]:
    """Ratios between the servers and the target's verdict."""
    summaries: dict[tuple[str, str, str], dict[str, Any]] = {}
    for s in series:
        if not s.failed:
            summary = growth_summary(s) if s.part == "growth" else burst_summary(s)
            summaries[(s.part, s.app, s.variant)] = summary

    def value(part: str, app: str, variant: str, attr: str) -> float | None:
        summary = summaries.get((part, app, variant))
        return None if summary is None else summary.get(attr)

    ratios: list[dict[str, Any]] = []
    pairs = (
        ("appmanager-smart", "appmanager-direct"),
        ("appmanager-smart", "passenger"),
        ("appmanager-direct", "passenger"),
    )
    for app in sorted({s.app for s in series if s.part == "growth"}, key=list(GROWTH_APPS).index):
        for num, den in pairs:
            for attr, what in (("uss", "USS per extra process"), ("spawn_ms", "spawn time")):
                r = _ratio(value("growth", app, num, attr), value("growth", app, den, attr))
                ratios.append(_ratio_entry("growth", app, num, den, attr, what, r))
    for app in sorted({s.app for s in series if s.part == "burst"}, key=list(BURST_APPS).index):
        for num, den in pairs:
            r = _ratio(value("burst", app, num, "total_s"), value("burst", app, den, "total_s"))
            ratios.append(
                _ratio_entry(
                    "burst", app, num, den, "total_s", f"time to serve all {BURST_CLIENTS}", r
                )
            )
    uss_ratio = _ratio(
        value("growth", "django", "appmanager-smart", "uss"),
        value("growth", "django", "appmanager-direct", "uss"),
    )
    spawn = value("growth", "django", "appmanager-smart", "spawn_ms")
    if not any(s.part == "growth" and s.app == "django" for s in series):
        verdict = "not evaluated (Django growth not run)"
    elif uss_ratio is None or spawn is None:
        missing = [
            VARIANT_BY_KEY[v].label
            for v in ("appmanager-smart", "appmanager-direct")
            if ("growth", "django", v) not in summaries
        ]
        verdict = f"not evaluated ({', '.join(missing) or 'figures'} missing)"
    elif uss_ratio < TARGET_USS_RATIO and spawn < TARGET_SPAWN_MS:
        verdict = "met"
    else:
        verdict = "not met"
    return {
        "summaries": {f"{p}/{a}/{v}": s for (p, a, v), s in summaries.items()},
        "ratios": ratios,
        "target": TARGET_TEXT,
        "target_figures": {
            "django_uss_smart_over_direct": uss_ratio,
            "django_smart_spawn_ms": spawn,
        },
        "verdict": verdict,
    }


def _ratio_entry(
    part: str, app: str, num: str, den: str, attr: str, what: str, r: float | None
) -> dict[str, Any]:
    apps = GROWTH_APPS if part == "growth" else BURST_APPS
    label = f"{apps[app].label}: {VARIANT_BY_KEY[num].label} / {VARIANT_BY_KEY[den].label} {what}"
    return {
        "part": part,
        "app": app,
        "numerator": num,
        "denominator": den,
        "attr": attr,
        "label": label,
        "ratio": r,
    }


# ----------------------------------------------------------------------------------- report


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _shorten(text: str, width: int = 160) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


GROWTH_HEADER = [
    "app",
    "server",
    "spawn method seen",
    "spawn time",
    "request → new process",
    "USS per extra process",
    "PSS per extra process",
    "app PSS growth per extra process",
    "preloader PSS / USS",
    "valid runs",
]
BURST_HEADER = [
    "app",
    "server",
    f"all {BURST_CLIENTS} answered",
    "fastest / slowest run",
    "processes that answered",
    "processes right after",
    "most spawns at once",
    "valid runs",
]


def growth_rows(series: list[Series], rounds: int) -> list[list[str]]:
    """The rows of the one-more-process table."""
    rows = []
    for s in series:
        if s.part != "growth":
            continue
        app, variant = GROWTH_APPS[s.app].label, VARIANT_BY_KEY[s.variant].label
        if s.failed:
            rows.append([app, variant, "FAILED", *["—"] * 6, f"0/{rounds}"])
            continue
        g = growth_summary(s)
        method = g["observed_method"]
        if g["configured_method"] and g["configured_method"] != method:
            method += f" (configured: {g['configured_method']})"
        preloader = (
            f"{g['preloader_pss'] / MIB:.1f} / {g['preloader_uss'] / MIB:.1f} MiB"
            if g["preloader_pss"] is not None
            else "none"
        )
        rows.append(
            [
                app,
                variant,
                method,
                _ms(g["spawn_ms"]),
                _ms(g["serve_ms"]),
                _mib(g["uss"]),
                _mib(g["pss"]),
                _mib(g["app_pss_per_extra"]),
                preloader,
                f"{g['valid_runs']}/{rounds}",
            ]
        )
    return rows


def burst_rows(series: list[Series], rounds: int) -> list[list[str]]:
    """The rows of the burst table."""
    rows = []
    for s in series:
        if s.part != "burst":
            continue
        app, variant = BURST_APPS[s.app].label, VARIANT_BY_KEY[s.variant].label
        if s.failed:
            rows.append([app, variant, "FAILED", "—", "—", "—", "—", f"0/{rounds}"])
            continue
        b = burst_summary(s)
        rows.append(
            [
                app,
                variant,
                f"{b['total_s']:.3f} s",
                f"{b['min_s']:.3f} / {b['max_s']:.3f} s",
                f"{b['processes']:g}",
                f"{b['processes_after']:g}",
                f"{b['spawns_at_once']:g}",
                f"{b['valid_runs']}/{rounds}",
            ]
        )
    return rows


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print(
            "  "
            + "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def print_report(series: list[Series], comparison: dict[str, Any], rounds: int) -> None:
    """Tables, ratios, the target's verdict, and the failures."""
    if any(s.part == "growth" for s in series):
        print(f"\none more process (medians over {rounds} rounds, per extra process):")
        _print_table(GROWTH_HEADER, growth_rows(series, rounds))
    if any(s.part == "burst" for s in series):
        print(f"\nburst of {BURST_CLIENTS} clients, {SLOW_REQUEST_S} s requests, from 1 process:")
        _print_table(BURST_HEADER, burst_rows(series, rounds))
    print()
    for entry in comparison["ratios"]:
        r = entry["ratio"]
        print(f"{entry['label'] + ':':<72} {'—' if r is None else f'{r:.2f}×'}")
    figures = comparison["target_figures"]
    if figures["django_uss_smart_over_direct"] is not None:
        print(
            f"\nDjango, smart / direct USS per extra process: "
            f"{figures['django_uss_smart_over_direct']:.2f} (target < {TARGET_USS_RATIO:.2f}); "
            f"smart spawn time {_ms(figures['django_smart_spawn_ms'])} "
            f"(target < {TARGET_SPAWN_MS:.0f} ms)"
        )
    print(f"target ({TARGET_TEXT}): {comparison['verdict']}")
    for s in series:
        if s.failed:
            print(f"\n{s.part} {s.app} {s.variant} FAILED:\n{s.error}")


# ------------------------------------------------------------------------------------ chart


def chart_svg(series: list[Series], meta: dict[str, Any]) -> str:
    """Rows per language: spawn time, USS per extra process, burst time; bars per server."""
    by_key = {(s.part, s.app, s.variant): s for s in series}
    variants = [v for v in VARIANTS if any(s.variant == v.key for s in series)]
    rows: list[list[Panel]] = []
    for growth_app, burst_app in (("django", "wsgi"), ("rails", "rack")):
        panels = []
        g_label, b_label = GROWTH_APPS[growth_app].label, BURST_APPS[burst_app].label
        spawn_bars, uss_bars, burst_bars = [], [], []
        for v in variants:
            label = v.label.removeprefix("appmanager ")
            g = by_key.get(("growth", growth_app, v.key))
            if g is not None:
                if g.failed:
                    spawn_bars.append(Bar(label, None, v.color, missing="failed"))
                    uss_bars.append(Bar(label, None, v.color, missing="failed"))
                else:
                    runs = [r for r in g.growth if r.ok]
                    summary = growth_summary(g)
                    spawn_points = [x for r in runs for x in r.spawn_ms if x is not None]
                    uss_points = [m["uss"] / MIB for r in runs for m in r.memory[1:]]
                    spawn_bars.append(Bar(label, summary["spawn_ms"], v.color, spawn_points))
                    uss = summary["uss"]
                    uss_bars.append(
                        Bar(label, None if uss is None else uss / MIB, v.color, uss_points)
                    )
            b = by_key.get(("burst", burst_app, v.key))
            if b is not None:
                if b.failed:
                    burst_bars.append(Bar(label, None, v.color, missing="failed"))
                else:
                    points = [r.total_s for r in b.burst if r.ok]
                    burst_bars.append(Bar(label, burst_summary(b)["total_s"], v.color, points))
        if spawn_bars:
            panels.append(Panel(f"{g_label}: spawn time, ms", spawn_bars, lambda x: f"{x:.0f}"))
            panels.append(
                Panel(f"{g_label}: USS per extra process, MiB", uss_bars, lambda x: f"{x:.1f}")
            )
        if burst_bars:
            panels.append(
                Panel(
                    f"{b_label}: {BURST_CLIENTS} × {SLOW_REQUEST_S} s requests, s",
                    burst_bars,
                    lambda x: f"{x:.2f}",
                )
            )
        if panels:
            rows.append(panels)
    columns = max((len(r) for r in rows), default=1)
    width, height = PANEL_W * columns, HEADER_H + PANEL_H * max(len(rows), 1) + FOOTER_H
    run = meta["run"]
    subtitle = (
        f"{run['date']} · {meta['machine']['logical_cpus']} CPUs · median of {run['rounds']} "
        f"rounds · lower is better · dots: processes (spawn, USS) and runs (burst)"
    )
    seen = [
        f"{GROWTH_APPS[s.app].label} {growth_summary(s)['observed_method']}"
        for s in series
        if s.part == "growth" and s.variant == "passenger" and not s.failed
    ]
    footer = "smart / direct: appmanager --spawn-method; Passenger: its default" + (
        f" (seen: {', '.join(seen)})" if seen else ""
    )
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}'>",
        f"  <rect width='{width}' height='{height}' fill='#fff'/>",
        "  " + _text(width / 2, 24, TITLE, size=15, font_weight="bold"),
        "  " + _text(width / 2, 44, subtitle, size=11, fill="#555"),
    ]
    for row_no, panels in enumerate(rows):
        for col, panel in enumerate(panels):
            parts.append("  " + render_panel(panel, col * PANEL_W, HEADER_H + row_no * PANEL_H))
    parts += ["  " + _text(width / 2, height - 8, footer, size=10, fill="#555"), "</svg>"]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------- docs


def docs_section(series: list[Series], comparison: dict[str, Any], meta: dict[str, Any]) -> str:
    """The Markdown between the lifecycle markers in docs/benchmarks.md."""
    machine, run = meta["machine"], meta["run"]
    versions = ", ".join(
        machine[k]
        for k in (
            "passenger_version",
            "python_version",
            "django_version",
            "ruby_version",
            "rails_version",
        )
        if k in machine
    )
    lines = [
        BEGIN_MARK,
        f"## {TITLE}",
        "",
        f"Measured {run['date']} on {machine['cpu_model']} ({machine['logical_cpus']} logical "
        f"CPUs, Linux {machine['kernel']}), appmanager at `{machine['appmanager_commit']}`, "
        f"{versions}; every server started afresh for each run with `--min-instances "
        f"{MIN_INSTANCES} --max-pool-size {MAX_POOL_SIZE}`, {run['rounds']} alternating rounds, "
        "medians. Run with `python3 bench/lifecycle.py --appmanager-rev HEAD --write-docs`.",
        "",
        f"![Process lifecycle: spawn time, memory per extra process, burst]({DOCS_SVG.name})",
        "",
    ]
    rounds = run["rounds"]
    if any(s.part == "growth" for s in series):
        lines += [
            f"### One more process: from 1 to {GROW_TO} processes",
            "",
            "Per extra process (the 2nd to the 4th; each run adds 3), medians over all of them:",
            "",
            "| " + " | ".join(GROWTH_HEADER) + " |",
            "| --- | --- | --- | " + "---: | " * (len(GROWTH_HEADER) - 4) + "---: |",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in growth_rows(series, rounds)]
        lines.append("")
        lines += _ratio_lines(comparison, "growth")
        lines.append(f"- target ({TARGET_TEXT}): **{comparison['verdict']}**")
        figures = comparison["target_figures"]
        if figures["django_uss_smart_over_direct"] is not None:
            lines[-1] += (
                f" (USS {figures['django_uss_smart_over_direct']:.2f}× a direct one's, "
                f"spawned in {_ms(figures['django_smart_spawn_ms'])})"
            )
        lines.append("")
    if any(s.part == "burst" for s in series):
        lines += [
            f"### Burst: {BURST_CLIENTS} clients at once against 1 process, "
            f"{SLOW_REQUEST_S} s per request",
            "",
            "| " + " | ".join(BURST_HEADER) + " |",
            "| --- | --- | " + "---: | " * (len(BURST_HEADER) - 3) + "---: |",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in burst_rows(series, rounds)]
        lines.append("")
        lines += _ratio_lines(comparison, "burst")
        lines.append("")
    lines += ["How it is measured:", ""]
    lines += [f"- {note}" for note in METHOD_NOTES]
    notes = observations(series)
    if notes:
        lines += ["", "Seen in this run:", ""]
        lines += [f"- {note}" for note in notes]
    failed = [s for s in series if s.failed]
    if failed:
        lines += ["", "Failed in this run:", ""]
        lines += [
            f"- {s.part} {s.app}, {VARIANT_BY_KEY[s.variant].label}: "
            f"{_shorten(_first_line(s.error))}"
            for s in failed
        ]
    lines.append(END_MARK)
    return "\n".join(lines)


def _ratio_lines(comparison: dict[str, Any], part: str) -> list[str]:
    return [
        f"- {e['label']}: {'—' if e['ratio'] is None else format(e['ratio'], '.2f') + '×'}"
        for e in comparison["ratios"]
        if e["part"] == part
    ]


METHOD_NOTES = (
    "Apps: Django is tests/apps/django_project (Django, two contrib apps, no database) and Rails "
    "the one-file Rails 6.1 app of tests/apps/rails_app (Action Controller only), each copied to "
    "a temp dir with a hold endpoint in front (bench/apps/hold/); the burst apps are "
    "bench/apps/slow_wsgi and bench/apps/slow_rack (stdlib / bare Rack, 0.5 s sleep per request).",
    "One more process: `GET /__bench/hold` makes the process that takes it serve 20 requests of "
    "the app in-process (`/` and `/info/` or `/items/1`), then stay busy until released. One such "
    "request at a time, each sent once the previous one has arrived in its process and warmed "
    "up, makes the server spawn exactly one more process; with 4 held, the 3 extra ones are "
    "measured, then all are released.",
    "Spawn time: what the server records. appmanager smart: `process P forked by preloader Q in "
    "N ms` (FORK sent to the preloader → the new process's READY); appmanager direct: `process P "
    "spawned` → `process P entered READY` in its log (posix_spawn → READY, loading the app "
    "included); Passenger: `spawn_end_time - spawn_start_time` from `passenger-status "
    "--show=xml`. Request → new process: from sending the request that needed the new process "
    "to it arriving in that process (what a client waits for on top of the request itself).",
    "Memory: psutil `memory_full_info()` of each extra process with all 4 up and held: USS "
    "(private memory: what the process alone costs) and PSS (its share of everything it maps). "
    "App PSS growth: the PSS of all the app's processes plus its preloader with 4 processes "
    "minus that with 1, over 3 — what each extra process adds to the machine. The preloader "
    "(appmanager smart, Passenger for Ruby) is reported on its own, not in the per-process "
    "figures.",
    "Spawn method seen: `smart` when every app process is a child of a preloader process, "
    "`direct` when there is no preloader and every app process is a child of the server's core.",
    f"Burst: {BURST_CLIENTS} threads, each with its own connection, released at once by a barrier "
    "right after the server started with 1 process; the time until the last answer. The "
    f"processes that answered come from each answer's `X-Pid` header. Most spawns at once: "
    "the most overlapping spawns of the burst's new processes, from the spawn times above. The "
    f"floor is {SLOW_REQUEST_S} s (one request's own time).",
)


def observations(series: list[Series]) -> list[str]:
    """What this run showed about how the servers spawn (for the docs)."""
    notes = []
    for s in series:
        if s.part != "growth" or s.variant != "passenger" or s.failed:
            continue
        g = growth_summary(s)
        app = GROWTH_APPS[s.app]
        if g["observed_method"] == "direct" and g["configured_method"] == "smart":
            notes.append(
                f"Passenger, {app.label}: passenger-status names `spawn_method` smart for the app, "
                "but spawns every process directly: there is no preloader, and every process is a "
                "child of the Passenger core that loads the app afresh (Passenger 6.0 has a "
                "preloader for Ruby apps only)."
            )
        elif g["observed_method"] == "smart":
            notes.append(
                f"Passenger, {app.label}: smart spawning, every process forked by its "
                "`Passenger AppPreloader` process."
            )
        elif g["observed_method"]:
            notes.append(f"Passenger, {app.label}: spawn method seen: {g['observed_method']}.")
    for s in series:
        serial = s.part == "burst" and s.variant == "passenger" and not s.failed
        if serial and burst_summary(s)["spawns_at_once"] == 1:
            notes.append(
                f"Burst, {BURST_APPS[s.app].label}: Passenger spawned one process at a time."
            )
    return notes


def update_docs(section: str, svg: str) -> None:
    """Write the chart and replace (or append) the lifecycle section of docs/benchmarks.md."""
    DOCS_SVG.write_text(svg)
    text = DOCS_MD.read_text()
    begin, end = text.find(BEGIN_MARK), text.find(END_MARK)
    if begin != -1 and end > begin:
        text = text[:begin] + section + text[end + len(END_MARK) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOCS_MD.write_text(text)
    print(f"updated {DOCS_MD.relative_to(repo_root())} and {DOCS_SVG.relative_to(repo_root())}")


# ------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Options; those of bench/all.py that mean nothing here are accepted and ignored."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs per server and app [3]")
    parser.add_argument(
        "--peers",
        default=",".join(VARIANT_BY_KEY),
        help=f"comma-separated subset of {list(VARIANT_BY_KEY)}",
    )
    parser.add_argument("--parts", default="growth,burst", help="growth, burst or both")
    parser.add_argument(
        "--apps",
        default=",".join([*GROWTH_APPS, *BURST_APPS]),
        help=f"subset of {[*GROWTH_APPS, *BURST_APPS]} (growth: django, rails; burst: wsgi, rack)",
    )
    parser.add_argument("--python", default=sys.executable, help="Python that runs the apps")
    parser.add_argument("--ruby", default=shutil.which("ruby") or "/usr/bin/ruby")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="JSON output dir")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--appmanager-cmd", default=None, help="command that runs appmanager's CLI")
    group.add_argument(
        "--appmanager-rev", default=None, metavar="REV", help="run appmanager as committed at REV"
    )
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md+svg")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir with logs")
    for ignored in ("--duration", "--warmup", "--connections"):
        parser.add_argument(ignored, type=int, default=None, help="ignored (no wrk here)")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be between 1 and 20")
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.apps = [a.strip() for a in args.apps.split(",") if a.strip()]
    if not args.peers or set(args.peers) - set(VARIANT_BY_KEY):
        parser.error(f"--peers: choose from {list(VARIANT_BY_KEY)}")
    if not args.parts or set(args.parts) - {"growth", "burst"}:
        parser.error("--parts: growth, burst")
    if not args.apps or set(args.apps) - {*GROWTH_APPS, *BURST_APPS}:
        parser.error(f"--apps: choose from {[*GROWTH_APPS, *BURST_APPS]}")
    return args


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """Where and with what the benchmark ran."""
    cpu_model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    if args.appmanager_rev:
        commit = args.appmanager_rev[:7]
    else:
        commit = version(["git", "-C", str(repo_root()), "describe", "--always", "--dirty"])
    return {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "kernel": platform.release(),
        "load_avg_at_start": os.getloadavg(),
        "python": args.python,
        "ruby": args.ruby,
        "appmanager_commit": commit,
        "passenger_version": version(["passenger", "--version"]),
        "python_version": version([args.python, "--version"]),
        "django_version": version(
            [args.python, "-c", "import django; print('Django', django.get_version())"]
        ),
        "ruby_version": version([args.ruby, "-e", 'print "Ruby #{RUBY_VERSION}"']),
        "rails_version": version(
            [args.ruby, "-e", 'require "rails"; print "Rails #{Rails.version}"']
        ),
    }


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts; exit 0 when every server produced figures, 1 when one failed."""
    args = parse_args(argv)
    if args.appmanager_rev:
        args.appmanager_rev = resolve_rev(args.appmanager_rev)
    signal.signal(signal.SIGTERM, _on_sigterm)
    now = time.gmtime()
    meta: dict[str, Any] = {
        "benchmark": SLUG,
        "run": {
            "date": time.strftime("%Y-%m-%d", now),
            "stamp": time.strftime("%Y%m%d-%H%M%S", now),
            "rounds": args.rounds,
            "min_instances": MIN_INSTANCES,
            "max_pool_size": MAX_POOL_SIZE,
            "grow_to": GROW_TO,
            "burst_clients": BURST_CLIENTS,
            "slow_request_s": SLOW_REQUEST_S,
        },
        "machine": machine_info(args),
    }
    variants = [v for v in VARIANTS if v.key in args.peers]
    work = Path(tempfile.mkdtemp(prefix="am-lc-"))
    series: list[Series] = []
    try:
        if args.appmanager_rev:
            args.appmanager_cmd = shlex.join(
                checkout_snapshot(args.appmanager_rev, work / "appmanager-src")
            )
        for part, apps in (("growth", GROWTH_APPS), ("burst", BURST_APPS)):
            chosen = [app for key, app in apps.items() if key in args.apps]
            if part in args.parts and chosen:
                print(f"{part}:", flush=True)
                series += run_series(part, chosen, variants, args, work)
    except KeyboardInterrupt:
        print("\ninterrupted; all servers stopped", file=sys.stderr)
        return 130
    except Terminated as exc:
        print("\nterminated; all servers stopped", file=sys.stderr)
        return int(exc.code or 143)
    finally:
        if args.keep_tmp:
            print(f"temp dir with logs kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    comparison = compare(series)
    print_report(series, comparison, args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        **meta,
        "series": [asdict(s) for s in series],
        **comparison,
    }
    json_path = args.out / f"{SLUG}-{meta['run']['stamp']}.json"
    json_path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    (args.out / f"{SLUG}-latest.json").write_text(json_path.read_text())
    svg = chart_svg(series, meta)
    (args.out / f"{SLUG}-{meta['run']['stamp']}.svg").write_text(svg)
    print(f"\nresults: {json_path}")
    if args.write_docs:
        update_docs(docs_section(series, comparison, meta), svg)
    return 0 if not any(s.failed for s in series) else 1


if __name__ == "__main__":
    sys.exit(main())
