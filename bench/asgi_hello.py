#!/usr/bin/env python3
"""Hello-world ASGI with 2 app processes: appmanager and uvicorn side by side.

The app is bench/apps/hello_asgi/app.py, a raw ASGI 3 callable (no framework). Both peers run at
once on free loopback ports and the rounds alternate between them; see bench/harness.py.

    python3 bench/asgi_hello.py [--duration 5] [--rounds 3] [--connections 16] [--out bench/results]
    python3 bench/asgi_hello.py --write-docs     # also docs/benchmarks.md and the SVG chart

A peer that fails to start is reported as failed; the other still runs. Every process the script
starts is stopped at the end, also on Ctrl-C, SIGTERM or error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness import (
    BENCH_DIR,
    Benchmark,
    PeerSpec,
    appmanager_cmd,
    interpreter_option,
    main,
    rps_ratio,
    rps_target,
)
from peers import AppManagerPeer, UvicornPeer

APP_DIR = BENCH_DIR / "apps" / "hello_asgi"

#: Prints what uvicorn runs on: its "auto" loop and HTTP parser pick uvloop and httptools when
#: they are importable.
UVICORN_STACK = """
import importlib.util, platform, uvicorn
def have(m):
    if importlib.util.find_spec(m) is None:
        return m + " not installed"
    return m + " " + getattr(importlib.import_module(m), "__version__", "?")
print(f"uvicorn {uvicorn.__version__} on {have('uvloop')} and {have('httptools')}, "
      f"{platform.python_implementation()} {platform.python_version()}")
"""


def versions(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The versions recorded with the results."""
    return [("uvicorn_version", [args.python, "-c", UVICORN_STACK])]


def _appmanager(args: argparse.Namespace, work: Path) -> AppManagerPeer:
    return AppManagerPeer(
        APP_DIR,
        work,
        appmanager_cmd(args),
        ["--python", args.python],
        note=AppManagerPeer.WHOLE_CONNECTIONS,
    )


def _uvicorn(args: argparse.Namespace, work: Path) -> UvicornPeer:
    return UvicornPeer(APP_DIR, work, args.python)


BENCHMARK = Benchmark(
    slug="asgi-hello",
    title="Hello-world ASGI, 2 app processes",
    description=__doc__.split("\n\n")[0],
    script="bench/asgi_hello.py",
    peers=(
        PeerSpec("appmanager", "#2b6cb0", _appmanager),
        PeerSpec("uvicorn", "#8a8a8a", _uvicorn),
    ),
    ratios=(rps_ratio("uvicorn"),),
    targets=(rps_target("req/s ≥ uvicorn's", "uvicorn"),),
    versions=versions,
    docs_versions=("uvicorn_version",),
    chart_footer="uvicorn: no core in the data path; uvloop and httptools; access log off",
    add_arguments=interpreter_option(
        "--python", sys.executable, "Python that both peers run the app with"
    ),
    notes=(
        "uvicorn: `python -m uvicorn --host 127.0.0.1 --port P --workers 2 --no-access-log "
        "app:app` in the app dir. Its default loop and HTTP parser (`auto`) are uvloop and "
        "httptools when they are installed, as they are here (appmanager depends on both: its "
        "core runs on uvloop and parses requests with httptools, and its ASGI app processes run "
        "on uvloop too when the app's Python has it, as here). uvicorn's access log is off, as "
        "appmanager logs no request either.",
        "appmanager's core reads each connection's first request head and hands the whole "
        "connection to the app process with the fewest (as for Node); the process parses and "
        "serves every request on it, so the core's CPU per request is about 0 with keep-alive. "
        "The app processes parse with httptools, as uvicorn does, when the app's Python has it.",
        "Both peers run the app with the same Python (`--python`).",
        "New TCP connections per request: the machine's count of opened TCP connections "
        "(ActiveOpens in /proc/net/snmp) over the measured run, divided by the requests; about 0 "
        "means keep-alive, about 1 a new connection per request; other programs on the machine "
        "add a little.",
    ),
)


if __name__ == "__main__":
    sys.exit(main(BENCHMARK))
