#!/usr/bin/env python3
"""Hello-world WSGI behind Apache, 2 app processes: appmanager's Apache module and mod_passenger.

Both peers are Apache from a self-contained httpd.conf (event MPM, Debian's settings) with one
module in front of the same app (bench/apps/hello_wsgi, the one wsgi_hello.py serves): appmanager's
module, which starts `appmanager core` with Apache and hands it the requests through
mod_proxy_http, and Phusion Passenger's, which starts the Passenger core. The rounds alternate
between them; see bench/harness.py.

    python3 bench/apache_hello.py [--duration 5] [--rounds 3] [--connections 16] [--python PATH]
    python3 bench/apache_hello.py --write-docs     # also docs/benchmarks.md and the SVG chart

The module is built with the measured appmanager's own `appmanager apache-module build`. A peer
that fails to start is reported as failed; the other still runs. Every process the script starts
(Apache, the cores, the app processes) is stopped at the end, also on Ctrl-C, SIGTERM or error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness import (
    APACHE_VERSION,
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
from peers import ApacheAppManagerPeer, ApachePassengerPeer

APP_DIR = BENCH_DIR / "apps" / "hello_wsgi"
APPMANAGER = ApacheAppManagerPeer.name
PASSENGER = ApachePassengerPeer.name


def versions(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The versions recorded with the results."""
    return [("python_version", [args.python, "--version"]), APACHE_VERSION, PASSENGER_VERSION]


def _appmanager(args: argparse.Namespace, work: Path) -> ApacheAppManagerPeer:
    return ApacheAppManagerPeer(
        APP_DIR, work, appmanager_cmd(args), args.python, args.appmanager_rev
    )


def _passenger(args: argparse.Namespace, work: Path) -> ApachePassengerPeer:
    return ApachePassengerPeer(APP_DIR, work, args.python)


BENCHMARK = Benchmark(
    slug="apache-hello",
    title="Hello-world WSGI behind Apache, 2 app processes",
    description=__doc__.split("\n\n")[0],
    script="bench/apache_hello.py",
    peers=(
        PeerSpec(APPMANAGER, "#2b6cb0", _appmanager),
        PeerSpec(PASSENGER, "#dd6b20", _passenger),
    ),
    ratios=(rps_ratio(PASSENGER), core_cpu_ratio(PASSENGER)),
    targets=(rps_target("req/s ≥ mod_passenger's", PASSENGER),),
    versions=versions,
    docs_versions=("apache_version", "passenger_version", "python_version"),
    chart_footer=(
        "both in Apache; core CPU: Apache's processes and the core each module starts "
        "(appmanager core, Passenger core)"
    ),
    add_arguments=interpreter_option(
        "--python", sys.executable, "Python that both peers run the app with"
    ),
    notes=(
        "Both peers run the same app with the same Python (`--python`), 2 processes started "
        "with the web server's first request; as root, both run it as root (appmanager: "
        "`AppManagerUserSwitching Off`; Passenger: `PassengerUserSwitching off`, "
        "`PassengerDefaultUser root`).",
        "Apache: `apache2 -DFOREGROUND -f httpd.conf`, a self-contained configuration with the "
        "event MPM and Debian's settings for it (2 children of 25 threads to start with), "
        "`KeepAlive On` with Debian's `MaxKeepAliveRequests 100` (so wrk opens a new connection "
        "every 100 requests), no access log. The workers run as nobody.",
        "appmanager: `AppManagerEnabled On`, `AppManagerAppRoot`, `AppManagerPython`, "
        "`AppManagerMinInstances 2` in the virtual host and `AppManagerMaxPoolSize 2` at the top "
        "level; the module (built by `appmanager apache-module build`) starts `appmanager core` "
        "when Apache starts and passes each request to mod_proxy_http, which keeps a pool of "
        "connections to the core's Unix socket.",
        "mod_passenger: Debian's mod_passenger with `PassengerAppRoot`, "
        "`PassengerAppType wsgi`, `PassengerStartupFile passenger_wsgi.py`, `PassengerPython`, "
        "`PassengerMinInstances 2`, `PassengerMaxPoolSize 2`.",
        "Connections between Apache and the core, counted with strace over sequential "
        "keep-alive requests: appmanager's module reuses mod_proxy_http's pooled connections "
        "(no connect per request); Passenger's module opens a new one to its core for every "
        "request (socket, connect, close).",
        "New TCP connections per request: the machine's count of opened TCP connections "
        "(ActiveOpens in /proc/net/snmp) over the measured run, divided by the requests; the "
        "connections between Apache and the core (Unix sockets) are not in it.",
    ),
)


if __name__ == "__main__":
    sys.exit(main(BENCHMARK))
