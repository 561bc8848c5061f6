#!/usr/bin/env python3
"""Hello-world WSGI with 2 app processes: appmanager, gunicorn and Passenger side by side.

All peers run at once, each on its own free loopback port; the rounds alternate between them
(A, B, C, A, B, C, ...) so that the machine's noise hits every peer alike. Each run is a short
wrk warm-up, then `wrk -t1 -cN -dDs --latency`; around the measured run the script reads the CPU
time (user + system) of the peer's core process(es) to get the core's CPU per request.

    python3 bench/wsgi_hello.py [--duration 5] [--rounds 3] [--connections 16] [--out bench/results]
    python3 bench/wsgi_hello.py --write-docs     # also docs/benchmarks.md and the SVG chart

A peer that fails to start is reported as failed; the others still run. Every process the script
starts is stopped at the end, also on Ctrl-C, SIGTERM or error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
from chart import Bar, Panel, render_svg
from peers import (
    AppManagerPeer,
    GunicornPeer,
    PassengerPeer,
    Peer,
    PeerStartError,
    cpu_seconds,
    default_appmanager_cmd,
    repo_root,
)
from wrk import WrkError, run_wrk, wrk_path

PEER_NAMES = ("appmanager", "gunicorn", "passenger")
BENCH_DIR = Path(__file__).resolve().parent
APP_DIR = BENCH_DIR / "apps" / "hello_wsgi"
DOCS_MD = repo_root() / "docs" / "benchmarks.md"
DOCS_SVG = repo_root() / "docs" / "benchmarks-wsgi-hello.svg"
BEGIN_MARK = "<!-- wsgi-hello:begin -->"
END_MARK = "<!-- wsgi-hello:end -->"
TARGET_RPS_RATIO = 1.5
COLORS = {"appmanager": "#2b6cb0", "gunicorn": "#8a8a8a", "passenger": "#dd6b20"}


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
            "valid_rounds": len(self.valid_rounds),
        }


class Terminated(SystemExit):
    """Raised from the SIGTERM handler so that the `finally` blocks stop the peers."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated(128 + signum)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, with bounds that keep every run short."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run [5]")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of wrk warm-up, 0: none [1]")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per peer [3]")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections [16]")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="JSON output dir")
    parser.add_argument(
        "--peers", default=",".join(PEER_NAMES), help=f"comma-separated subset of {PEER_NAMES}"
    )
    parser.add_argument(
        "--appmanager-cmd",
        default=None,
        help="command that runs the appmanager CLI [appmanager on PATH, else the checkout's]",
    )
    parser.add_argument(
        "--python", default=sys.executable, help="Python that Passenger runs the app with"
    )
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
    unknown = set(args.peers) - set(PEER_NAMES)
    if unknown or not args.peers:
        parser.error(f"--peers: unknown {sorted(unknown)}; choose from {PEER_NAMES}")
    return args


def make_peers(args: argparse.Namespace, work_dir: Path) -> list[Peer]:
    """The selected peers, in the fixed order of PEER_NAMES."""
    am_cmd = shlex.split(args.appmanager_cmd) if args.appmanager_cmd else default_appmanager_cmd()
    factories: dict[str, Callable[[], Peer]] = {
        "appmanager": lambda: AppManagerPeer(APP_DIR, work_dir, args.python, am_cmd),
        "gunicorn": lambda: GunicornPeer(APP_DIR, work_dir, args.python),
        "passenger": lambda: PassengerPeer(APP_DIR, work_dir, args.python),
    }
    return [factories[name]() for name in PEER_NAMES if name in args.peers]


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


def measure(peer: Peer, round_no: int, args: argparse.Namespace) -> RoundResult:
    """Warm up, then one measured wrk run with the core's CPU time read around it."""
    if args.warmup > 0:
        run_wrk(peer.url, args.warmup, args.connections)
    cores = peer.core_processes()
    if peer.has_core and not cores:
        raise RuntimeError(f"no core process found for {peer.name}")
    cpu_before = cpu_seconds(cores)
    wrk = run_wrk(peer.url, args.duration, args.connections)
    cpu_after = cpu_seconds(cores)
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
    )
    if not result.ok:
        result.error = f"{wrk.non_2xx} non-2xx responses of {wrk.requests}"
    if cores and wrk.requests > 0:
        result.core_cpu_s = round(cpu_after - cpu_before, 3)
        result.core_us_per_request = round(result.core_cpu_s / wrk.requests * 1e6, 2)
    return result


def run_round(peer: Peer, result: PeerResult, round_no: int, args: argparse.Namespace) -> None:
    """Measure one round of one peer and record it; a dead peer is marked failed."""
    try:
        rnd = measure(peer, round_no, args)
    except (WrkError, RuntimeError, psutil.Error) as exc:
        rnd = RoundResult(round=round_no, ok=False, error=str(exc))
    result.rounds.append(rnd)
    cpu = _fmt(rnd.core_us_per_request, ".1f", " µs/req")
    state = f"  {rnd.socket_errors} socket errors" if rnd.socket_errors else ""
    state += "" if rnd.ok else f"  INVALID: {_first_line(rnd.error)}"
    print(
        f"  round {round_no} {peer.name:<10} {rnd.rps:>10,.0f} req/s  "
        f"p99 {rnd.p99_ms:6.2f} ms  core {cpu}{state}",
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


def run_benchmark(args: argparse.Namespace, work_dir: Path) -> list[PeerResult]:
    """Start all peers, alternate the rounds between them, and always stop them."""
    peers = make_peers(args, work_dir)
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


def compare(results: list[PeerResult]) -> dict[str, Any]:
    """The appmanager ratios and whether the target is met."""
    by_name = {r.name: r for r in results if r.status == "ok"}

    def med(name: str, attr: str) -> float | None:
        return by_name[name].median(attr) if name in by_name else None

    ratios = {
        "rps_appmanager_over_passenger": ratio(med("appmanager", "rps"), med("passenger", "rps")),
        "rps_appmanager_over_gunicorn": ratio(med("appmanager", "rps"), med("gunicorn", "rps")),
        "core_cpu_appmanager_over_passenger": ratio(
            med("appmanager", "core_us_per_request"), med("passenger", "core_us_per_request")
        ),
    }
    rps_ratio = ratios["rps_appmanager_over_passenger"]
    cpu_ratio = ratios["core_cpu_appmanager_over_passenger"]
    if rps_ratio is None or cpu_ratio is None:
        missing = [n for n in ("appmanager", "passenger") if n not in by_name]
        verdict = f"not evaluated ({', '.join(missing) or 'figures'} missing)"
    elif rps_ratio >= TARGET_RPS_RATIO and cpu_ratio < 1.0:
        verdict = "met"
    else:
        verdict = "not met"
    target = f"≥ {TARGET_RPS_RATIO}× Passenger's req/s and core CPU per request below Passenger's"
    return {"ratios": ratios, "target": target, "verdict": verdict}


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _shorten(text: str, width: int = 160) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


RATIO_LABELS = {
    "rps_appmanager_over_passenger": "appmanager / Passenger req/s",
    "rps_appmanager_over_gunicorn": "appmanager / gunicorn req/s",
    "core_cpu_appmanager_over_passenger": "appmanager / Passenger core CPU per request",
}


def ratio_lines(comparison: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, formatted ratio) for the three appmanager ratios."""
    ratios = comparison["ratios"]
    return [(label, _fmt(ratios[key], ".2f", "×")) for key, label in RATIO_LABELS.items()]


def table_rows(results: list[PeerResult], rounds: int) -> list[list[str]]:
    """One row per peer: name, req/s, p99, core µs/req, valid rounds, note or failure."""
    rows = []
    for r in results:
        if r.status != "ok":
            rows.append([r.name, "FAILED", "—", "—", f"0/{rounds}", _shorten(_first_line(r.error))])
            continue
        s = r.summary()
        rows.append(
            [
                r.name,
                _fmt(s["rps"], ",.0f"),
                _fmt(s["p99_ms"], ".2f", " ms"),
                _fmt(s["core_us_per_request"], ".1f", " µs") if r.has_core else "no core",
                f"{s['valid_rounds']}/{rounds}",
                r.note,
            ]
        )
    return rows


def print_report(results: list[PeerResult], comparison: dict[str, Any], rounds: int) -> None:
    """The table of medians, the ratios and the target verdict."""
    header = ["peer", "req/s", "p99", "core CPU/req", "rounds", "note"]
    rows = [header, *table_rows(results, rounds)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    print(f"\nmedians over {rounds} rounds:")
    for row in rows:
        cells = [
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=False))
        ]
        print("  " + "  ".join([*cells, row[-1]]))
    print()
    for label, value in ratio_lines(comparison):
        print(f"{label + ':':<46} {value}")
    print(f"target ({comparison['target']}): {comparison['verdict']}")
    for r in results:
        if r.status != "ok":
            print(f"\n{r.name} failed:\n{r.error}")


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return _first_line(out.stdout or out.stderr) or "unavailable"


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """Where and with what the benchmark ran."""
    cpu_model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = _version(["git", "-C", str(repo_root()), "describe", "--always", "--dirty"])
    return {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "kernel": platform.release(),
        "load_avg_at_start": os.getloadavg(),
        "python": args.python,
        "python_version": _version([args.python, "--version"]),
        "appmanager_commit": commit,
        "passenger_version": _version(["passenger", "--version"]),
        "gunicorn_version": _version(["gunicorn", "--version"]),
        "wrk_version": _version(["wrk", "-v"]),
    }


def chart_svg(results: list[PeerResult], meta: dict[str, Any]) -> str:
    """Two panels: median req/s and median core CPU per request, dots for the rounds."""
    rps_bars, cpu_bars = [], []
    for r in results:
        color = COLORS[r.name]
        if r.status != "ok":
            rps_bars.append(Bar(r.name, None, color, missing="failed"))
            cpu_bars.append(Bar(r.name, None, color, missing="failed"))
            continue
        rps_bars.append(Bar(r.name, r.median("rps"), color, [x.rps for x in r.valid_rounds]))
        cpu_points = [x.core_us_per_request for x in r.valid_rounds if x.core_us_per_request]
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
        "Hello-world WSGI, 2 app processes",
        subtitle,
        [
            Panel("Requests per second (higher is better)", rps_bars),
            Panel("Core CPU per request, µs (lower is better)", cpu_bars, lambda v: f"{v:.1f}"),
        ],
        footer="gunicorn: sync workers close every connection and have no core in the data path",
    )


DOCS_INTRO = """# Benchmarks

The scripts in `bench/` start appmanager and its peers side by side in one invocation and
alternate the rounds between them (A, B, C, A, B, C, ...), so that the machine's noise hits every
peer alike. Each run is a short wrk warm-up followed by a measured `wrk -t1 -c16 -d5s --latency`.

What is measured, per peer (medians over the rounds):

- **req/s** and **p99 latency** as wrk reports them;
- **core CPU per request**: user + system CPU time of the peer's *core* process(es) during the
  measured run, divided by the number of requests wrk completed. The core is the process between
  the client and the app processes; the app processes themselves are not counted.

The machine is small (2 cores, shared with other work and noisy), and wrk runs on the same cores:
absolute figures move from run to run by 10 % or more, so the **ratios** between peers measured in
the same run matter more than the absolutes. Rerun with:

```
python3 bench/wsgi_hello.py --write-docs     # see bench/README.md for the options
```

"""


def docs_section(
    results: list[PeerResult], comparison: dict[str, Any], meta: dict[str, Any]
) -> str:
    """The Markdown that goes between the wsgi-hello markers of docs/benchmarks.md."""
    machine, run = meta["machine"], meta["run"]
    lines = [
        BEGIN_MARK,
        "## Hello-world WSGI, 2 app processes",
        "",
        f"Measured {run['date']} on {machine['cpu_model']} ({machine['logical_cpus']} logical "
        f"CPUs, Linux {machine['kernel']}), appmanager at `{machine['appmanager_commit']}`, "
        f"{machine['passenger_version']}, {machine['gunicorn_version']}, "
        f"{machine['python_version']}; `wrk -t1 -c{run['connections']} -d{run['duration_s']:g}s`, "
        f"{run['rounds']} alternating rounds, medians.",
        "",
        "![Hello-world WSGI: req/s and core CPU per request](benchmarks-wsgi-hello.svg)",
        "",
        "| peer | req/s | p99 latency | core CPU per request | valid rounds | notes |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results, run["rounds"])]
    lines.append("")
    lines += [f"- {label}: {value}" for label, value in ratio_lines(comparison)]
    lines += [
        f"- target ({comparison['target']}): **{comparison['verdict']}**",
        "",
        "What counts as core CPU:",
        "",
    ]
    lines += [f"- {r.name}: {r.core_description}." for r in results]
    failed = [r for r in results if r.status != "ok"]
    if failed:
        lines += ["", "Failed in this run:", ""]
        lines += [f"- {r.name}: {_first_line(r.error)}" for r in failed]
    lines.append(END_MARK)
    return "\n".join(lines)


def update_docs(section: str, svg: str) -> None:
    """Write the chart and replace (or append) the marked section of docs/benchmarks.md."""
    DOCS_SVG.parent.mkdir(parents=True, exist_ok=True)
    DOCS_SVG.write_text(svg)
    text = DOCS_MD.read_text() if DOCS_MD.exists() else DOCS_INTRO
    begin, end = text.find(BEGIN_MARK), text.find(END_MARK)
    if begin != -1 and end > begin:
        text = text[:begin] + section + text[end + len(END_MARK) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOCS_MD.write_text(text)
    print(f"updated {DOCS_MD.relative_to(repo_root())} and {DOCS_SVG.relative_to(repo_root())}")


def write_outputs(
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
    json_path = args.out / f"wsgi-hello-{stamp}.json"
    json_path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    (args.out / "wsgi-hello-latest.json").write_text(json_path.read_text())
    svg = chart_svg(results, meta)
    (args.out / f"wsgi-hello-{stamp}.svg").write_text(svg)
    print(f"\nresults: {json_path}")
    if args.write_docs:
        update_docs(docs_section(results, comparison, meta), svg)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 0 when every peer produced figures, 1 when one failed."""
    args = parse_args(argv)
    if wrk_path() is None:
        print("wrk is not on PATH (apt-get install wrk)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    now = time.gmtime()
    meta = {
        "benchmark": "wsgi-hello",
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
        "machine": machine_info(args),
    }
    work = Path(tempfile.mkdtemp(prefix="appmanager-bench-"))
    try:
        results = run_benchmark(args, work)
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
    comparison = compare(results)
    print_report(results, comparison, args.rounds)
    write_outputs(args, results, comparison, meta)
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
