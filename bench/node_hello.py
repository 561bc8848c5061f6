#!/usr/bin/env python3
"""Hello-world Node with 2 app processes: appmanager, Passenger and Node's cluster side by side.

The app is bench/apps/hello_node/app.js, a bare `http.createServer` (no framework); the baseline
runs it under Node's cluster module with 2 workers (bench/apps/hello_node/cluster.js). All peers
run at once on free loopback ports and the rounds alternate between them; see bench/harness.py.

    python3 bench/node_hello.py [--duration 5] [--rounds 3] [--connections 16] [--out bench/results]
    python3 bench/node_hello.py --write-docs     # also docs/benchmarks.md and the SVG chart

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
from peers import AppManagerPeer, NodeClusterPeer, PassengerPeer

APP_DIR = BENCH_DIR / "apps" / "hello_node"
TARGET_CLUSTER_RATIO = 0.9


def versions(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The versions recorded with the results."""
    return [
        ("node_version", [args.nodejs, "-e", "console.log('Node.js ' + process.version)"]),
        PASSENGER_VERSION,
    ]


def _appmanager(args: argparse.Namespace, work: Path) -> AppManagerPeer:
    note = "per-connection handoff (as Node's cluster does); keep-alive"
    return AppManagerPeer(APP_DIR, work, appmanager_cmd(args), ["--nodejs", args.nodejs], note)


def _passenger(args: argparse.Namespace, work: Path) -> PassengerPeer:
    return PassengerPeer(APP_DIR, work, ["--nodejs", args.nodejs])


def _cluster(args: argparse.Namespace, work: Path) -> NodeClusterPeer:
    return NodeClusterPeer(APP_DIR, work, args.nodejs)


BENCHMARK = Benchmark(
    slug="node-hello",
    title="Hello-world Node, 2 app processes",
    description=__doc__.split("\n\n")[0],
    script="bench/node_hello.py",
    peers=(
        PeerSpec("appmanager", "#2b6cb0", _appmanager),
        PeerSpec("passenger", "#dd6b20", _passenger),
        PeerSpec("cluster", "#8a8a8a", _cluster),
    ),
    ratios=(
        rps_ratio("passenger", "Passenger"),
        rps_ratio("cluster"),
        core_cpu_ratio("passenger", "Passenger"),
    ),
    targets=(
        rps_target("req/s ≥ Passenger's", "passenger"),
        rps_target(
            f"req/s ≥ {TARGET_CLUSTER_RATIO}× the bare cluster's", "cluster", TARGET_CLUSTER_RATIO
        ),
    ),
    versions=versions,
    docs_versions=("passenger_version", "node_version"),
    chart_footer="cluster: Node's cluster module, 2 workers on one port, no core in the data path",
    add_arguments=interpreter_option(
        "--nodejs",
        shutil.which("node") or "/usr/bin/node",
        "Node.js that every peer runs the app with [node on PATH]",
    ),
    notes=(
        "Every peer runs the app with the same Node.js (`--nodejs`), with NODE_ENV=production.",
        "appmanager hands a Node app whole connections over Node's IPC channel (Node has no "
        "public API to take one request's descriptor), so with keep-alive its core sees each "
        "of wrk's 16 connections once and then no request at all: its CPU per request is about "
        "zero, and the app processes serve the clients directly, as the cluster's workers do.",
        "cluster: `PORT=P WORKERS=2 node cluster.js` in the app dir. The primary forks 2 workers "
        "that each run app.js on the same port; on Linux the primary accepts the connections and "
        "passes each to a worker in turn, and the workers serve the requests, with keep-alive.",
        "New TCP connections per request: the machine's count of opened TCP connections "
        "(ActiveOpens in /proc/net/snmp) over the measured run, divided by the requests; about 0 "
        "means keep-alive, about 1 a new connection per request; other programs on the machine "
        "add a little.",
    ),
)


if __name__ == "__main__":
    sys.exit(main(BENCHMARK))
