"""The side-by-side benchmark harness behind bench/*_hello.py.

A script describes its benchmark as a `Benchmark` (the app, the peers, the ratios to report, the
targets) and calls `main(BENCHMARK)`. The harness starts every peer once, each on its own free
loopback port, alternates the rounds between them (A, B, C, A, B, C, ...) so that the machine's
noise hits every peer alike, and stops everything it started at the end, also on Ctrl-C, SIGTERM
or error. Each run is a short wrk warm-up, then `wrk -t1 -cN -dDs --latency`; around the measured
run the harness reads the CPU time (user + system) of the peer's core process(es) to get the
core's CPU per request, and the system's count of TCP connections opened (how many new
connections the peer's keep-alive policy made wrk open).

A peer that fails to start is reported as failed; the others still run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
from chart import Bar, Panel, render_svg
from peers import Peer, PeerStartError, cpu_seconds, default_appmanager_cmd, repo_root
from wrk import WrkError, run_wrk, wrk_path

BENCH_DIR = Path(__file__).resolve().parent
DOCS_MD = repo_root() / "docs" / "benchmarks.md"
#: The order of the sections in docs/benchmarks.md; a new section goes to its place in it.
SECTION_ORDER = ("wsgi-hello", "asgi-hello", "ruby-hello", "node-hello")


@dataclass(frozen=True)
class PeerSpec:
    """One peer of a benchmark: its name, chart color, and how to make it from the options."""

    name: str
    color: str
    make: Callable[[argparse.Namespace, Path], Peer]  # (options, work dir) -> Peer


@dataclass(frozen=True)
class RatioSpec:
    """One reported ratio: the median `attr` of `numerator` over that of `denominator`."""

    key: str
    label: str
    numerator: str
    denominator: str
    attr: str = "rps"


@dataclass(frozen=True)
class Condition:
    """A bound on one ratio (by key): `ratio >= at_least` and/or `ratio < below`."""

    ratio: str
    at_least: float | None = None
    below: float | None = None

    def holds(self, value: float) -> bool:
        """Whether `value` satisfies the bound(s)."""
        if self.at_least is not None and value < self.at_least:
            return False
        return self.below is None or value < self.below


@dataclass(frozen=True)
class Target:
    """A target of the issue, met when all its conditions hold."""

    text: str
    conditions: tuple[Condition, ...]


def rps_ratio(peer: str, label: str | None = None) -> RatioSpec:
    """appmanager's req/s over `peer`'s (named `label` in the report, default `peer`)."""
    return RatioSpec(
        f"rps_appmanager_over_{peer}", f"appmanager / {label or peer} req/s", "appmanager", peer
    )


def core_cpu_ratio(peer: str, label: str | None = None) -> RatioSpec:
    """appmanager's core CPU per request over `peer`'s."""
    return RatioSpec(
        f"core_cpu_appmanager_over_{peer}",
        f"appmanager / {label or peer} core CPU per request",
        "appmanager",
        peer,
        attr="core_us_per_request",
    )


def rps_target(text: str, peer: str, at_least: float = 1.0) -> Target:
    """The target that appmanager's req/s be at least `at_least` times `peer`'s."""
    return Target(text, (Condition(f"rps_appmanager_over_{peer}", at_least=at_least),))


def interpreter_option(
    option: str, default: str, help_text: str
) -> Callable[[argparse.ArgumentParser], None]:
    """`Benchmark.add_arguments` for the one option most benchmarks have: the interpreter the
    peers run the app with (`--python`, `--ruby`, `--nodejs`), stored under its name."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(option, default=default, help=help_text)

    return add_arguments


#: (key, command) for `Benchmark.versions`, of programs several benchmarks compare with.
PASSENGER_VERSION = ("passenger_version", ["passenger", "--version"])
GUNICORN_VERSION = ("gunicorn_version", ["gunicorn", "--version"])
NGINX_VERSION = ("nginx_version", ["sh", "-c", "nginx -v 2>&1 | sed 's/^nginx version: //'"])
APACHE_VERSION = ("apache_version", ["sh", "-c", "apache2 -v | sed -n 's/^Server version: //p'"])


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """A benchmark with no options of its own."""


@dataclass(frozen=True)
class Benchmark:
    """Everything that differs between the hello-world benchmarks."""

    slug: str  # names the markers, the result files and the chart: "wsgi-hello"
    title: str  # "Hello-world WSGI, 2 app processes"
    description: str  # first line of --help
    script: str  # "bench/wsgi_hello.py", for the docs
    peers: tuple[PeerSpec, ...]
    ratios: tuple[RatioSpec, ...]
    targets: tuple[Target, ...]
    #: (key, command) pairs whose first output line goes into the machine info, e.g.
    #: ("passenger_version", ["passenger", "--version"]).
    versions: Callable[[argparse.Namespace], list[tuple[str, list[str]]]]
    #: The version keys named in the docs' "Measured ..." line, in order.
    docs_versions: tuple[str, ...]
    chart_footer: str
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    #: Whether the table shows the new TCP connections per request (how a peer does keep-alive).
    connections_column: bool = True
    #: Extra lines under "Notes:" at the end of the docs section.
    notes: tuple[str, ...] = ()
    #: Whether the docs say how many measured runs overlapped another program's wrk.
    report_noise: bool = True

    @property
    def peer_names(self) -> tuple[str, ...]:
        """The peers' names in their fixed order."""
        return tuple(p.name for p in self.peers)

    @property
    def begin_mark(self) -> str:
        """The line opening this benchmark's section of docs/benchmarks.md."""
        return f"<!-- {self.slug}:begin -->"

    @property
    def end_mark(self) -> str:
        """The line closing this benchmark's section of docs/benchmarks.md."""
        return f"<!-- {self.slug}:end -->"

    @property
    def docs_svg(self) -> Path:
        """The chart that docs/benchmarks.md shows for this benchmark."""
        return repo_root() / "docs" / f"benchmarks-{self.slug}.svg"


@dataclass
class RoundResult:
    """One measured wrk run against one peer."""

    round: int
    ok: bool
    error: str = ""
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    non_2xx: int = 0
    socket_errors: int = 0
    core_cpu_s: float | None = None
    core_us_per_request: float | None = None
    core_pids: list[int] = field(default_factory=list)
    #: TCP connections opened on the machine during the run (wrk's, plus any other program's).
    new_connections: int | None = None
    connections_per_request: float | None = None
    #: wrk processes of other programs running when the measured run began (noise).
    other_wrk: int = 0


@dataclass
class PeerResult:
    """Everything measured for one peer, and its medians over the valid rounds."""

    name: str
    command: str
    note: str
    core_description: str
    has_core: bool
    status: str = "ok"  # "ok" or "failed"
    error: str = ""
    rounds: list[RoundResult] = field(default_factory=list)

    @property
    def valid_rounds(self) -> list[RoundResult]:
        """Rounds that completed with only 2xx responses."""
        return [r for r in self.rounds if r.ok]

    def median(self, attr: str) -> float | None:
        """Median of one RoundResult attribute over the valid rounds (None if there is none)."""
        values = [getattr(r, attr) for r in self.valid_rounds]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    def summary(self) -> dict[str, Any]:
        """The medians as a JSON-ready dict."""
        return {
            "rps": self.median("rps"),
            "p99_ms": self.median("p99_ms"),
            "core_us_per_request": self.median("core_us_per_request"),
            "connections_per_request": self.median("connections_per_request"),
            "valid_rounds": len(self.valid_rounds),
        }


class Terminated(SystemExit):
    """Raised from the SIGTERM handler so that the `finally` blocks stop the peers."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated(128 + signum)


def add_common_arguments(parser: argparse.ArgumentParser, peer_names: Sequence[str]) -> None:
    """The options every benchmark script has."""
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run [5]")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of wrk warm-up, 0: none [1]")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per peer [3]")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections [16]")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="JSON output dir")
    parser.add_argument(
        "--peers", default=",".join(peer_names), help=f"comma-separated subset of {peer_names}"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--appmanager-cmd",
        default=None,
        help="command that runs the appmanager CLI [appmanager on PATH, else the checkout's]",
    )
    group.add_argument(
        "--appmanager-rev",
        default=None,
        metavar="REV",
        help="run appmanager as committed at REV (e.g. HEAD), not the working tree's",
    )


def parse_args(bench: Benchmark, argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, with bounds that keep every run short."""
    parser = argparse.ArgumentParser(description=bench.description)
    add_common_arguments(parser, bench.peer_names)
    bench.add_arguments(parser)
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md+svg")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir with logs")
    args = parser.parse_args(argv)
    bounds = {
        "duration": (1, 60),
        "warmup": (0, 30),
        "rounds": (1, 20),
        "connections": (1, 1024),
    }
    for name, (low, high) in bounds.items():
        if not low <= getattr(args, name) <= high:
            parser.error(f"--{name} must be between {low} and {high}")
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(args.peers) - set(bench.peer_names)
    if unknown or not args.peers:
        parser.error(f"--peers: unknown {sorted(unknown)}; choose from {bench.peer_names}")
    return args


def appmanager_cmd(args: argparse.Namespace) -> list[str]:
    """The command that runs the appmanager CLI: --appmanager-cmd, else the default."""
    return shlex.split(args.appmanager_cmd) if args.appmanager_cmd else default_appmanager_cmd()


def resolve_rev(rev: str) -> str:
    """The full hash of the commit `rev` names (once, so that a commit made meanwhile by someone
    else cannot slip in between the report and the snapshot); SystemExit when there is none."""
    result = subprocess.run(
        ["git", "-C", str(repo_root()), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"--appmanager-rev: {rev!r} names no commit")
    return result.stdout.strip()


def checkout_snapshot(rev: str, dest: Path) -> list[str]:
    """Export appmanager/ and spawners/ as committed at `rev` into `dest`, laid out as installed
    (the shims under appmanager/spawners), and return the command that runs that CLI.

    The working tree may hold other people's unfinished edits; a snapshot measures a known state.
    """
    archive = subprocess.run(
        ["git", "-C", str(repo_root()), "archive", "--format=tar", rev, "appmanager", "spawners"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if archive.returncode != 0:
        raise SystemExit(f"--appmanager-rev {rev}: {archive.stderr.decode(errors='replace')}")
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    shutil.copytree(dest / "spawners", dest / "appmanager" / "spawners")
    # sys.path[0] puts the snapshot before any installed or editable appmanager.
    code = f"import sys; sys.path.insert(0, {str(dest)!r}); from appmanager.cli import main; main()"
    return [sys.executable, "-c", code]


def make_peers(bench: Benchmark, args: argparse.Namespace, work_dir: Path) -> list[Peer]:
    """The selected peers, in the benchmark's fixed order."""
    return [spec.make(args, work_dir) for spec in bench.peers if spec.name in args.peers]


def start_peer(peer: Peer, result: PeerResult) -> None:
    """Start one peer; on failure mark its result failed instead of raising."""
    print(f"starting {peer.name} on {peer.url} ...", flush=True)
    began = time.monotonic()
    try:
        result.command = peer.describe_command()
        peer.start()
    except PeerStartError as exc:
        result.status, result.error = "failed", str(exc)
        print(f"  {peer.name} FAILED to start: {_first_line(str(exc))}", flush=True)
        return
    print(f"  {peer.name} ready in {time.monotonic() - began:.1f} s", flush=True)


def tcp_active_opens() -> int | None:
    """The machine's count of TCP connections opened so far (ActiveOpens in /proc/net/snmp)."""
    try:
        lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()]
    except OSError:
        return None
    tcp = [ln for ln in lines if ln and ln[0] == "Tcp:"]
    if len(tcp) < 2 or "ActiveOpens" not in tcp[0]:
        return None
    return int(tcp[1][tcp[0].index("ActiveOpens")])


def other_wrk_processes() -> int:
    """How many wrk processes run on the machine that this script did not start."""
    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    count = 0
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "wrk" and proc.pid not in ours:
            count += 1
    return count


def measure(peer: Peer, round_no: int, args: argparse.Namespace) -> RoundResult:
    """Warm up, then one measured wrk run with the core's CPU time read around it."""
    if args.warmup > 0:
        run_wrk(peer.url, args.warmup, args.connections)
    cores = peer.core_processes()
    if peer.has_core and not cores:
        raise RuntimeError(f"no core process found for {peer.name}")
    other_wrk = other_wrk_processes()
    opens_before = tcp_active_opens()
    cpu_before = cpu_seconds(cores)
    wrk = run_wrk(peer.url, args.duration, args.connections)
    cpu_after = cpu_seconds(cores)
    opens_after = tcp_active_opens()
    result = RoundResult(
        round=round_no,
        ok=wrk.non_2xx == 0 and wrk.requests > 0,
        rps=wrk.rps,
        p50_ms=round(wrk.p50_ms, 3),
        p99_ms=round(wrk.p99_ms, 3),
        requests=wrk.requests,
        non_2xx=wrk.non_2xx,
        socket_errors=wrk.socket_errors,
        core_pids=[p.pid for p in cores],
        other_wrk=other_wrk,
    )
    if not result.ok:
        result.error = f"{wrk.non_2xx} non-2xx responses of {wrk.requests}"
    if cores and wrk.requests > 0:
        result.core_cpu_s = round(cpu_after - cpu_before, 3)
        result.core_us_per_request = round((cpu_after - cpu_before) / wrk.requests * 1e6, 3)
    if opens_before is not None and opens_after is not None and wrk.requests > 0:
        result.new_connections = opens_after - opens_before
        result.connections_per_request = round(result.new_connections / wrk.requests, 4)
    return result


def run_round(peer: Peer, result: PeerResult, round_no: int, args: argparse.Namespace) -> None:
    """Measure one round of one peer and record it; a dead peer is marked failed."""
    try:
        rnd = measure(peer, round_no, args)
    except (WrkError, RuntimeError, psutil.Error) as exc:
        rnd = RoundResult(round=round_no, ok=False, error=str(exc))
    result.rounds.append(rnd)
    cpu = _fmt(rnd.core_us_per_request, ".1f", " µs/req")
    conns = _fmt(rnd.connections_per_request, ".2f")
    state = f"  {rnd.socket_errors} socket errors" if rnd.socket_errors else ""
    state += "  (another wrk was running)" if rnd.other_wrk else ""
    state += "" if rnd.ok else f"  INVALID: {_first_line(rnd.error)}"
    print(
        f"  round {round_no} {peer.name:<10} {rnd.rps:>10,.0f} req/s  "
        f"p99 {rnd.p99_ms:6.2f} ms  core {cpu}  new conns/req {conns}{state}",
        flush=True,
    )
    if not peer.is_alive():
        result.status, result.error = "failed", f"{peer.name} died during round {round_no}"
        print(f"  {peer.name} FAILED: its server is gone", flush=True)


def stop_all(peers: list[Peer]) -> None:
    """Stop every peer, with Ctrl-C and SIGTERM held off so that a second one cannot cut it short.

    Each stop is bounded (SIGTERM, a wait, then SIGKILL), so this always ends.
    """
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for peer in peers:
            print(f"stopping {peer.name} ...", flush=True)
            try:
                peer.stop()
            except Exception as exc:  # keep stopping the others
                print(f"  could not stop {peer.name} cleanly: {exc}", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_benchmark(bench: Benchmark, args: argparse.Namespace, work_dir: Path) -> list[PeerResult]:
    """Start all peers, alternate the rounds between them, and always stop them."""
    peers = make_peers(bench, args, work_dir)
    results = {
        p.name: PeerResult(p.name, "", p.note, p.core_description, p.has_core) for p in peers
    }
    try:
        for peer in peers:
            start_peer(peer, results[peer.name])
        for round_no in range(1, args.rounds + 1):
            for peer in peers:
                if results[peer.name].status == "ok":
                    run_round(peer, results[peer.name], round_no, args)
    finally:
        stop_all(peers)
    for result in results.values():
        if result.status == "ok" and not result.valid_rounds:
            result.status, result.error = "failed", "no valid round"
    return list(results.values())


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def compare(bench: Benchmark, results: list[PeerResult]) -> dict[str, Any]:
    """The appmanager ratios and, per target, whether it is met.

    The keys `target` and `verdict` sum up all targets (one target: that target's).
    """
    by_name = {r.name: r for r in results if r.status == "ok"}

    def med(name: str, attr: str) -> float | None:
        return by_name[name].median(attr) if name in by_name else None

    specs = {spec.key: spec for spec in bench.ratios}
    ratios = {
        key: ratio(med(s.numerator, s.attr), med(s.denominator, s.attr)) for key, s in specs.items()
    }
    targets = []
    for target in bench.targets:
        values = [ratios[c.ratio] for c in target.conditions]
        known = [v for v in values if v is not None]
        if len(known) < len(values):
            involved = [
                name
                for c in target.conditions
                for name in (specs[c.ratio].numerator, specs[c.ratio].denominator)
            ]
            missing = [n for n in dict.fromkeys(involved) if n not in by_name]
            verdict = f"not evaluated ({', '.join(missing) or 'figures'} missing)"
        elif all(c.holds(v) for c, v in zip(target.conditions, known, strict=True)):
            verdict = "met"
        else:
            verdict = "not met"
        targets.append({"target": target.text, "verdict": verdict})
    verdicts = [t["verdict"] for t in targets]
    if all(v == "met" for v in verdicts):
        overall = "met"
    elif any(v == "not met" for v in verdicts):
        overall = "not met"
    else:
        overall = next(v for v in verdicts if v != "met")
    return {
        "ratios": ratios,
        "targets": targets,
        "target": "; ".join(t["target"] for t in targets),
        "verdict": overall,
    }


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _shorten(text: str, width: int = 160) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def ratio_lines(bench: Benchmark, comparison: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, formatted ratio) for the benchmark's appmanager ratios."""
    ratios = comparison["ratios"]
    return [(s.label, _fmt(ratios[s.key], ".2f", "×")) for s in bench.ratios]


def table_header(bench: Benchmark) -> list[str]:
    """The column names of the docs table."""
    header = ["peer", "req/s", "p99 latency", "core CPU per request"]
    if bench.connections_column:
        header.append("new TCP connections per request")
    return [*header, "valid rounds", "notes"]


def table_rows(bench: Benchmark, results: list[PeerResult], rounds: int) -> list[list[str]]:
    """One row per peer: name, req/s, p99, core µs/req, [conns/req], valid rounds, note."""
    rows = []
    for r in results:
        if r.status != "ok":
            cells = [r.name, "FAILED", "—", "—"]
            if bench.connections_column:
                cells.append("—")
            rows.append([*cells, f"0/{rounds}", _shorten(_first_line(r.error))])
            continue
        s = r.summary()
        cells = [
            r.name,
            _fmt(s["rps"], ",.0f"),
            _fmt(s["p99_ms"], ".2f", " ms"),
            _fmt(s["core_us_per_request"], ".1f", " µs") if r.has_core else "no core",
        ]
        if bench.connections_column:
            cells.append(_fmt(s["connections_per_request"], ".2f"))
        rows.append([*cells, f"{s['valid_rounds']}/{rounds}", r.note])
    return rows


def print_report(
    bench: Benchmark, results: list[PeerResult], comparison: dict[str, Any], rounds: int
) -> None:
    """The table of medians, the ratios and the target verdicts."""
    header = ["peer", "req/s", "p99", "core CPU/req"]
    if bench.connections_column:
        header.append("conns/req")
    header += ["rounds", "note"]
    rows = [header, *table_rows(bench, results, rounds)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    print(f"\nmedians over {rounds} rounds:")
    for row in rows:
        cells = [
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=False))
        ]
        print("  " + "  ".join([*cells, row[-1]]))
    print()
    for label, value in ratio_lines(bench, comparison):
        print(f"{label + ':':<46} {value}")
    for target in comparison["targets"]:
        print(f"target ({target['target']}): {target['verdict']}")
    for r in results:
        if r.status != "ok":
            print(f"\n{r.name} failed:\n{r.error}")


def version(cmd: list[str]) -> str:
    """The first line a version command prints, or "unavailable"."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return _first_line(out.stdout or out.stderr) or "unavailable"


def machine_info(bench: Benchmark, args: argparse.Namespace) -> dict[str, Any]:
    """Where and with what the benchmark ran."""
    cpu_model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if args.appmanager_rev:  # a full hash by now (resolve_rev)
        commit = args.appmanager_rev[:7]
    else:
        commit = version(["git", "-C", str(repo_root()), "describe", "--always", "--dirty"])
    info: dict[str, Any] = {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "kernel": platform.release(),
        "load_avg_at_start": os.getloadavg(),
    }
    for interpreter in ("python", "ruby", "nodejs"):
        if isinstance(getattr(args, interpreter, None), str):
            info[interpreter] = getattr(args, interpreter)
    info["appmanager_commit"] = commit
    for key, cmd in bench.versions(args):
        info[key] = version(cmd)
    info["wrk_version"] = version(["wrk", "-v"])
    return info


def chart_svg(bench: Benchmark, results: list[PeerResult], meta: dict[str, Any]) -> str:
    """Two panels: median req/s and median core CPU per request, dots for the rounds."""
    colors = {spec.name: spec.color for spec in bench.peers}
    rps_bars, cpu_bars = [], []
    for r in results:
        color = colors[r.name]
        if r.status != "ok":
            rps_bars.append(Bar(r.name, None, color, missing="failed"))
            cpu_bars.append(Bar(r.name, None, color, missing="failed"))
            continue
        rps_bars.append(Bar(r.name, r.median("rps"), color, [x.rps for x in r.valid_rounds]))
        cpu_points = [
            x.core_us_per_request for x in r.valid_rounds if x.core_us_per_request is not None
        ]
        missing = "n/a" if r.has_core else "no core"
        cpu_bars.append(
            Bar(r.name, r.median("core_us_per_request"), color, cpu_points, missing=missing)
        )
    run = meta["run"]
    subtitle = (
        f"{run['date']} · {meta['machine']['logical_cpus']} CPUs · median of {run['rounds']} "
        f"rounds · wrk -t1 -c{run['connections']} -d{run['duration_s']:g}s · dots: rounds"
    )
    return render_svg(
        bench.title,
        subtitle,
        [
            Panel("Requests per second (higher is better)", rps_bars),
            Panel("Core CPU per request, µs (lower is better)", cpu_bars, lambda v: f"{v:.1f}"),
        ],
        footer=bench.chart_footer,
    )


DOCS_INTRO = """# Benchmarks

The scripts in `bench/` start appmanager and its peers side by side in one invocation and
alternate the rounds between them (A, B, C, A, B, C, ...), so that the machine's noise hits every
peer alike. Each run is a short wrk warm-up followed by a measured `wrk -t1 -c16 -d5s --latency`.

What is measured, per peer (medians over the rounds):

- **req/s** and **p99 latency** as wrk reports them;
- **core CPU per request**: user + system CPU time of the peer's *core* process(es) during the
  measured run, divided by the number of requests wrk completed. The core is the process between
  the client and the app processes; the app processes themselves are not counted. Servers whose
  workers accept the clients themselves (gunicorn, uvicorn, puma, unicorn, Node's cluster) have
  no core: "no core".
- **new TCP connections per request** (all but the WSGI table): the TCP connections opened on the
  machine during the run per request; about 0 means keep-alive, about 1 a new connection for
  every request.

The machine is small (2 cores, shared with other work and noisy), and wrk runs on the same cores:
absolute figures move from run to run by 10 % or more, so the **ratios** between peers measured in
the same run matter more than the absolutes. Rerun with:

```
python3 bench/all.py --appmanager-rev HEAD --write-docs   # every section below; or one of them:
python3 bench/wsgi_hello.py --write-docs     # asgi_hello.py, ruby_hello.py, node_hello.py
```

`--appmanager-rev HEAD` measures appmanager as committed (a `git archive` snapshot) rather than a
working tree that may hold unfinished edits. See bench/README.md for the options and how each peer
is started.

"""


def docs_section(
    bench: Benchmark, results: list[PeerResult], comparison: dict[str, Any], meta: dict[str, Any]
) -> str:
    """The Markdown that goes between the benchmark's markers in docs/benchmarks.md."""
    machine, run = meta["machine"], meta["run"]
    versions = ", ".join(machine[key] for key in bench.docs_versions)
    header = table_header(bench)
    lines = [
        bench.begin_mark,
        f"## {bench.title}",
        "",
        f"Measured {run['date']} on {machine['cpu_model']} ({machine['logical_cpus']} logical "
        f"CPUs, Linux {machine['kernel']}), appmanager at `{machine['appmanager_commit']}`, "
        f"{versions}; `wrk -t1 -c{run['connections']} -d{run['duration_s']:g}s`, "
        f"{run['rounds']} alternating rounds, medians.",
        "",
        f"![{bench.title.split(',')[0]}: req/s and core CPU per request]({bench.docs_svg.name})",
        "",
        "| " + " | ".join(header) + " |",
        "| --- | " + "---: | " * (len(header) - 2) + "--- |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(bench, results, run["rounds"])]
    lines.append("")
    lines += [f"- {label}: {value}" for label, value in ratio_lines(bench, comparison)]
    lines += [f"- target ({t['target']}): **{t['verdict']}**" for t in comparison["targets"]]
    lines += ["", "What counts as core CPU:", ""]
    lines += [f"- {r.name}: {r.core_description}." for r in results]
    notes = list(bench.notes)
    runs = [rnd for r in results for rnd in r.rounds]
    noisy = sum(1 for rnd in runs if rnd.other_wrk)
    if bench.report_noise and noisy:
        notes.append(
            f"{noisy} of the {len(runs)} measured runs began while another program's wrk was "
            "running on the machine: those figures are noisier than the others."
        )
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {note}" for note in notes]
    failed = [r for r in results if r.status != "ok"]
    if failed:
        lines += ["", "Failed in this run:", ""]
        lines += [f"- {r.name}: {_first_line(r.error)}" for r in failed]
    lines.append(bench.end_mark)
    return "\n".join(lines)


def _insert_position(text: str, slug: str) -> int | None:
    """Where a new section goes: before the first present section that SECTION_ORDER puts after
    it (None: at the end)."""
    later = SECTION_ORDER[SECTION_ORDER.index(slug) + 1 :] if slug in SECTION_ORDER else ()
    positions = [text.find(f"<!-- {s}:begin -->") for s in later]
    positions = [p for p in positions if p != -1]
    return min(positions) if positions else None


def update_docs(bench: Benchmark, section: str, svg: str) -> None:
    """Write the chart and replace (or insert) the marked section of docs/benchmarks.md."""
    bench.docs_svg.parent.mkdir(parents=True, exist_ok=True)
    bench.docs_svg.write_text(svg)
    text = DOCS_MD.read_text() if DOCS_MD.exists() else DOCS_INTRO
    begin, end = text.find(bench.begin_mark), text.find(bench.end_mark)
    if begin != -1 and end > begin:
        text = text[:begin] + section + text[end + len(bench.end_mark) :]
    elif (position := _insert_position(text, bench.slug)) is not None:
        text = text[:position] + section + "\n\n" + text[position:]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOCS_MD.write_text(text)
    print(
        f"updated {DOCS_MD.relative_to(repo_root())} and {bench.docs_svg.relative_to(repo_root())}"
    )


def write_outputs(
    bench: Benchmark,
    args: argparse.Namespace,
    results: list[PeerResult],
    comparison: dict[str, Any],
    meta: dict[str, Any],
) -> None:
    """JSON and SVG into --out; with --write-docs also the docs."""
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        **meta,
        "peers": {r.name: {**asdict(r), "median": r.summary()} for r in results},
        **comparison,
    }
    stamp = meta["run"]["stamp"]
    json_path = args.out / f"{bench.slug}-{stamp}.json"
    json_path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    (args.out / f"{bench.slug}-latest.json").write_text(json_path.read_text())
    svg = chart_svg(bench, results, meta)
    (args.out / f"{bench.slug}-{stamp}.svg").write_text(svg)
    print(f"\nresults: {json_path}")
    if args.write_docs:
        update_docs(bench, docs_section(bench, results, comparison, meta), svg)


def main(bench: Benchmark, argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 0 when every peer produced figures, 1 when one failed."""
    args = parse_args(bench, argv)
    if wrk_path() is None:
        print("wrk is not on PATH (apt-get install wrk)", file=sys.stderr)
        return 2
    if args.appmanager_rev:
        args.appmanager_rev = resolve_rev(args.appmanager_rev)
    signal.signal(signal.SIGTERM, _on_sigterm)
    now = time.gmtime()
    meta = {
        "benchmark": bench.slug,
        "run": {
            "date": time.strftime("%Y-%m-%d", now),
            "stamp": time.strftime("%Y%m%d-%H%M%S", now),
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "connections": args.connections,
            "wrk_threads": 1,
            "app_processes": 2,
        },
        "machine": machine_info(bench, args),
    }
    work = Path(tempfile.mkdtemp(prefix="appmanager-bench-"))
    try:
        if args.appmanager_rev:
            args.appmanager_cmd = shlex.join(
                checkout_snapshot(args.appmanager_rev, work / "appmanager-src")
            )
        results = run_benchmark(bench, args, work)
    except KeyboardInterrupt:
        print("\ninterrupted; all peers stopped", file=sys.stderr)
        return 130
    except Terminated as exc:
        print("\nterminated; all peers stopped", file=sys.stderr)
        return int(exc.code or 143)
    finally:
        if args.keep_tmp:
            print(f"temp dir with logs kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    comparison = compare(bench, results)
    print_report(bench, results, comparison, args.rounds)
    write_outputs(bench, args, results, comparison, meta)
    return 0 if all(r.status == "ok" for r in results) else 1
