#!/usr/bin/env python3
"""Hello-world WSGI behind a web server, 2 app processes: nginx with appmanager's module, nginx
proxying to gunicorn, and Apache with mod_passenger, side by side.

The app is bench/apps/hello_wsgi, the one wsgi_hello.py serves. The peers:

- appmanager: nginx with appmanager's nginx module (`appmanager_enabled on`), which starts
  `appmanager core` with nginx and hands it every request over the core's Unix socket;
- gunicorn: nginx `proxy_pass` to `gunicorn -w 2` on a Unix socket, with an upstream
  keepalive pool;
- mod_passenger: Apache with Phusion Passenger's module (Passenger's nginx engine cannot be
  built from Debian's packages; its Apache module is the web server integration it ships here).

The rounds alternate between them; see bench/harness.py.

    python3 bench/nginx_hello.py [--duration 5] [--rounds 3] [--connections 16] [--python PATH]
    python3 bench/nginx_hello.py --write-docs     # also docs/benchmarks.md and the SVG chart

The module is built with the measured appmanager's own `appmanager nginx-module build`. A peer
that fails to start is reported as failed; the others still run. Every process the script starts
(nginx, Apache, gunicorn, the cores, the app processes) is stopped at the end, also on Ctrl-C,
SIGTERM or error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness import (
    APACHE_VERSION,
    BENCH_DIR,
    GUNICORN_VERSION,
    NGINX_VERSION,
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
from peers import ApachePassengerPeer, NginxAppManagerPeer, NginxGunicornPeer

APP_DIR = BENCH_DIR / "apps" / "hello_wsgi"
APPMANAGER = NginxAppManagerPeer.name
GUNICORN = NginxGunicornPeer.name
PASSENGER = ApachePassengerPeer.name


def versions(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The versions recorded with the results."""
    python = ("python_version", [args.python, "--version"])
    return [python, NGINX_VERSION, GUNICORN_VERSION, APACHE_VERSION, PASSENGER_VERSION]


def _appmanager(args: argparse.Namespace, work: Path) -> NginxAppManagerPeer:
    return NginxAppManagerPeer(
        APP_DIR, work, appmanager_cmd(args), args.python, args.appmanager_rev
    )


def _gunicorn(args: argparse.Namespace, work: Path) -> NginxGunicornPeer:
    return NginxGunicornPeer(APP_DIR, work)


def _passenger(args: argparse.Namespace, work: Path) -> ApachePassengerPeer:
    return ApachePassengerPeer(APP_DIR, work, args.python)


BENCHMARK = Benchmark(
    slug="nginx-hello",
    title="Hello-world WSGI behind nginx, 2 app processes",
    description=__doc__.split("\n\n")[0],
    script="bench/nginx_hello.py",
    peers=(
        PeerSpec(APPMANAGER, "#2b6cb0", _appmanager),
        PeerSpec(GUNICORN, "#8a8a8a", _gunicorn),
        PeerSpec(PASSENGER, "#dd6b20", _passenger),
    ),
    ratios=(rps_ratio(GUNICORN), rps_ratio(PASSENGER), core_cpu_ratio(PASSENGER)),
    targets=(
        rps_target("req/s ≥ nginx → gunicorn's", GUNICORN),
        rps_target("req/s ≥ Apache + mod_passenger's", PASSENGER),
    ),
    versions=versions,
    docs_versions=(
        "nginx_version",
        "gunicorn_version",
        "apache_version",
        "passenger_version",
        "python_version",
    ),
    chart_footer=(
        "appmanager and gunicorn behind nginx, mod_passenger in Apache; core CPU: the web "
        "server + the core its module starts"
    ),
    add_arguments=interpreter_option(
        "--python", sys.executable, "Python that every peer runs the app with"
    ),
    notes=(
        "Every peer runs the same app with the same Python (`--python`), 2 processes; as root, "
        "all of them run it as root (appmanager: `appmanager_user_switching off`; Passenger: "
        "`PassengerUserSwitching off`, `PassengerDefaultUser root`).",
        "nginx (both nginx peers): `nginx -p RUN/ -c nginx.conf`, a self-contained configuration "
        "with `worker_processes auto` (one per CPU), `access_log off`, nginx's default keep-alive "
        "for clients; the workers run as nobody.",
        "appmanager: `appmanager_enabled on`, `appmanager_app_root`, `appmanager_python`, "
        "`appmanager_min_instances 2` in the server block and `appmanager_max_pool_size 2` in "
        "the http block; the module (built by `appmanager nginx-module build`) starts "
        "`appmanager core` when nginx starts, and each worker keeps idle connections to the "
        "core's Unix socket for later requests.",
        "gunicorn: `gunicorn -w 2 -b unix:SOCK passenger_wsgi:application` behind "
        "`proxy_pass http://gunicorn` with `upstream gunicorn { server unix:SOCK; keepalive 8; }`, "
        '`proxy_http_version 1.1` and `proxy_set_header Connection ""`. gunicorn\'s sync '
        "workers close the connection after every response, so the pool stays empty and nginx "
        "opens a new Unix-socket connection per request.",
        "mod_passenger: Apache with Passenger's module, as in the Apache section below (event "
        "MPM with Debian's settings, `MaxKeepAliveRequests 100`, so wrk opens a new connection "
        "every 100 requests).",
        "Connections behind the web server, counted with strace over sequential keep-alive "
        "requests: nginx's workers reuse their connections to appmanager's core (no connect per "
        "request); nginx opens a new one to gunicorn per request (socket, connect, close), and "
        "so does Passenger's Apache module to its core.",
        "New TCP connections per request: the machine's count of opened TCP connections "
        "(ActiveOpens in /proc/net/snmp) over the measured run, divided by the requests; the "
        "connections between the web server and the core or gunicorn (Unix sockets) are not in "
        "it.",
    ),
)


if __name__ == "__main__":
    sys.exit(main(BENCHMARK))
