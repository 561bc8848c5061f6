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
import sys
from pathlib import Path

from harness import (
    BENCH_DIR,
    GUNICORN_VERSION,
    PASSENGER_VERSION,
    Benchmark,
    Condition,
    PeerSpec,
    Target,
    appmanager_cmd,
    core_cpu_ratio,
    interpreter_option,
    main,
    rps_ratio,
)
from peers import AppManagerPeer, GunicornPeer, PassengerPeer

APP_DIR = BENCH_DIR / "apps" / "hello_wsgi"
TARGET_RPS_RATIO = 1.5


def versions(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The versions recorded with the results."""
    return [("python_version", [args.python, "--version"]), PASSENGER_VERSION, GUNICORN_VERSION]


def _appmanager(args: argparse.Namespace, work: Path) -> AppManagerPeer:
    return AppManagerPeer(APP_DIR, work, appmanager_cmd(args))


def _gunicorn(args: argparse.Namespace, work: Path) -> GunicornPeer:
    return GunicornPeer(APP_DIR, work)


def _passenger(args: argparse.Namespace, work: Path) -> PassengerPeer:
    return PassengerPeer(APP_DIR, work, ["--python", args.python])


BENCHMARK = Benchmark(
    slug="wsgi-hello",
    title="Hello-world WSGI, 2 app processes",
    description=__doc__.split("\n\n")[0],
    script="bench/wsgi_hello.py",
    peers=(
        PeerSpec("appmanager", "#2b6cb0", _appmanager),
        PeerSpec("gunicorn", "#8a8a8a", _gunicorn),
        PeerSpec("passenger", "#dd6b20", _passenger),
    ),
    ratios=(
        rps_ratio("passenger", "Passenger"),
        rps_ratio("gunicorn"),
        core_cpu_ratio("passenger", "Passenger"),
    ),
    targets=(
        Target(
            f"≥ {TARGET_RPS_RATIO}× Passenger's req/s and core CPU per request below Passenger's",
            (
                Condition("rps_appmanager_over_passenger", at_least=TARGET_RPS_RATIO),
                Condition("core_cpu_appmanager_over_passenger", below=1.0),
            ),
        ),
    ),
    versions=versions,
    docs_versions=("passenger_version", "gunicorn_version", "python_version"),
    chart_footer="gunicorn: sync workers close every connection and have no core in the data path",
    add_arguments=interpreter_option(
        "--python", sys.executable, "Python that Passenger runs the app with"
    ),
    connections_column=False,
    report_noise=False,
)


if __name__ == "__main__":
    sys.exit(main(BENCHMARK))
