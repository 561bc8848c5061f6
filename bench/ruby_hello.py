#!/usr/bin/env python3
"""Hello-world Rack with 2 app processes: appmanager, Passenger, puma and unicorn side by side.

The app is bench/apps/hello_rack/config.ru, a bare Rack lambda (no framework, no gems). All peers
run at once on free loopback ports and the rounds alternate between them; see bench/harness.py.

    python3 bench/ruby_hello.py [--duration 5] [--rounds 3] [--connections 16] [--out bench/results]
    python3 bench/ruby_hello.py --write-docs     # also docs/benchmarks.md and the SVG chart

A peer that fails to start is reported as failed; the others still run. Every process the script
starts is stopped at the end, also on Ctrl-C, SIGTERM or error.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from harness import (
    BENCH_DIR,
    PASSENGER_VERSION,
    Benchmark,
    PeerSpec,
    appmanager_cmd,
    core_cpu_ratio,
    interpreter_option,
    main,
    rps_ratio,
    rps_target,
)
from peers import AppManagerPeer, PassengerPeer, PumaPeer, UnicornPeer

APP_DIR = BENCH_DIR / "apps" / "hello_rack"


def versions(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The versions recorded with the results."""
    return [
        ("ruby_version", [args.ruby, "-e", 'print "Ruby #{RUBY_VERSION}"']),
        PASSENGER_VERSION,
        ("puma_version", [args.ruby, shutil.which("puma") or "puma", "--version"]),
        ("unicorn_version", [args.ruby, shutil.which("unicorn") or "unicorn", "-v"]),
    ]


def _appmanager(args: argparse.Namespace, work: Path) -> AppManagerPeer:
    return AppManagerPeer(
        APP_DIR,
        work,
        appmanager_cmd(args),
        ["--ruby", args.ruby],
        note=AppManagerPeer.WHOLE_CONNECTIONS,
    )


def _passenger(args: argparse.Namespace, work: Path) -> PassengerPeer:
    note = (
        "builtin engine (C++ core proxies every request); keep-alive; app processes forked "
        "from a preloader (smart spawning)"
    )
    return PassengerPeer(APP_DIR, work, ["--ruby", args.ruby], note=note)


def _puma(args: argparse.Namespace, work: Path) -> PumaPeer:
    return PumaPeer(APP_DIR, work, args.ruby)


def _unicorn(args: argparse.Namespace, work: Path) -> UnicornPeer:
    return UnicornPeer(APP_DIR, work, args.ruby)


BENCHMARK = Benchmark(
    slug="ruby-hello",
    title="Hello-world Rack, 2 app processes",
    description=__doc__.split("\n\n")[0],
    script="bench/ruby_hello.py",
    peers=(
        PeerSpec("appmanager", "#2b6cb0", _appmanager),
        PeerSpec("passenger", "#dd6b20", _passenger),
        PeerSpec("puma", "#8a8a8a", _puma),
        PeerSpec("unicorn", "#b7b7b7", _unicorn),
    ),
    ratios=(
        rps_ratio("passenger", "Passenger"),
        rps_ratio("puma"),
        rps_ratio("unicorn"),
        core_cpu_ratio("passenger", "Passenger"),
    ),
    targets=(
        rps_target("req/s ≥ Passenger's", "passenger"),
        rps_target("req/s ≥ puma's", "puma"),
        rps_target("req/s ≥ unicorn's", "unicorn"),
    ),
    versions=versions,
    docs_versions=("passenger_version", "puma_version", "unicorn_version", "ruby_version"),
    chart_footer=(
        "puma and unicorn: no core in the data path; unicorn closes every connection, "
        "puma some under load"
    ),
    add_arguments=interpreter_option(
        "--ruby",
        shutil.which("ruby") or "/usr/bin/ruby",
        "Ruby that every peer runs the app with [ruby on PATH]",
    ),
    notes=(
        "Every peer runs the app with the same Ruby (`--ruby`), in the production environment.",
        "puma: `puma -b tcp://127.0.0.1:P -w 2 -t 1:1 -e production config.ru`. It keeps "
        "connections alive, but closes one after 10 requests when its worker's one thread is busy "
        "and a new connection waits on the listener (puma 5's `max_fast_inline` fairness rule), "
        "so wrk opens a new connection about every 10 requests: see the connections column.",
        "unicorn: `unicorn -l 127.0.0.1:P -E production -c CONF config.ru` with "
        "`worker_processes 2` in CONF. It answers `Connection: close` to every request by design "
        "(it expects a buffering reverse proxy in front), so each request costs a new TCP "
        "connection.",
        "New TCP connections per request: the machine's count of opened TCP connections "
        "(ActiveOpens in /proc/net/snmp) over the measured run, divided by the requests; about 0 "
        "means keep-alive, about 1 a new connection per request; other programs on the machine "
        "add a little.",
    ),
)


if __name__ == "__main__":
    sys.exit(main(BENCHMARK))
