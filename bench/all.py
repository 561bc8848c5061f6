#!/usr/bin/env python3
"""Run the benchmarks one after the other: WSGI, ASGI, Ruby (Rack), Node, WSGI behind nginx and
behind Apache, process lifecycle.

    python3 bench/all.py [--only wsgi,asgi,ruby,node,nginx,apache,lifecycle] [options passed on]
    python3 bench/all.py --write-docs --rounds 3

Options other than --only go to every script unchanged (--duration, --rounds, --connections,
--warmup, --out, --appmanager-cmd, --appmanager-rev, --write-docs, --keep-tmp; lifecycle.py runs
no wrk and ignores --duration, --warmup and --connections). Each script runs in its own session;
Ctrl-C or SIGTERM here is passed on to the one running (as SIGTERM), which stops its peers, and
the rest are skipped. Exit status: the worst of the scripts' (0 all fine,
1 a peer failed, 2 a tool missing), or 130/143 when interrupted.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

BENCH_DIR = Path(__file__).resolve().parent
SCRIPTS = {
    "wsgi": "wsgi_hello.py",
    "asgi": "asgi_hello.py",
    "ruby": "ruby_hello.py",
    "node": "node_hello.py",
    "nginx": "nginx_hello.py",
    "apache": "apache_hello.py",
    "lifecycle": "lifecycle.py",
}
#: The options every script accepts, with whether each takes a value.
SHARED_OPTIONS = {
    "--duration": True,
    "--warmup": True,
    "--rounds": True,
    "--connections": True,
    "--out": True,
    "--appmanager-cmd": True,
    "--appmanager-rev": True,
    "--write-docs": False,
    "--keep-tmp": False,
}
#: The signals that stopped the run, with the exit status each stands for.
STOPPED_BY: dict[int, int] = {}


def parse_args(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(the scripts to run, the options to pass to each)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SCRIPTS), help=f"subset of {list(SCRIPTS)}")
    for option, takes_value in SHARED_OPTIONS.items():
        if takes_value:
            parser.add_argument(option, help="passed to every script")
        else:
            parser.add_argument(option, action="store_true", help="passed to every script")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SCRIPTS))
    if unknown or not names:
        parser.error(f"--only: unknown {unknown}; choose from {list(SCRIPTS)}")
    passed: list[str] = []
    for option, takes_value in SHARED_OPTIONS.items():
        value = getattr(args, option[2:].replace("-", "_"))
        if takes_value and value is not None:
            passed += [option, value]
        elif not takes_value and value:
            passed.append(option)
    return names, passed


def resolve_rev(rev: str) -> str:
    """The full hash of the commit `rev` names; SystemExit when there is none."""
    result = subprocess.run(
        [
            "git",
            "-C",
            str(BENCH_DIR.parent),
            "rev-parse",
            "--verify",
            "--quiet",
            f"{rev}^{{commit}}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"--appmanager-rev: {rev!r} names no commit")
    return result.stdout.strip()


def run_script(script: str, options: list[str]) -> int:
    """Run one benchmark script to its end, passing Ctrl-C and SIGTERM on to it."""
    cmd = [sys.executable, str(BENCH_DIR / script), *options]
    print(f"\n=== {' '.join([Path(cmd[1]).name, *options])}", flush=True)
    child = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum: int, frame: FrameType | None) -> None:
        # SIGTERM either way: a script started from a background job ignores SIGINT.
        STOPPED_BY[signum] = 128 + signum
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()  # the script stops its own peers, also when signalled
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Run the selected scripts in order; stop early when interrupted."""
    names, options = parse_args(argv)
    if "--appmanager-rev" in options:  # one commit for all the scripts, whatever lands meanwhile
        at = options.index("--appmanager-rev") + 1
        options[at] = resolve_rev(options[at])
    statuses: dict[str, int] = {}
    for name in names:
        statuses[name] = run_script(SCRIPTS[name], options)
        if STOPPED_BY:
            skipped = names[len(statuses) :]
            if skipped:
                print(f"\ninterrupted; skipped {', '.join(skipped)}", file=sys.stderr)
            return max(STOPPED_BY.values())
    print("\n=== summary")
    for name, status in statuses.items():
        meaning = {0: "ok", 1: "a peer failed", 2: "a tool is missing"}.get(status, "error")
        print(f"  {SCRIPTS[name]:<16} exit {status} ({meaning})")
    return max(statuses.values())


if __name__ == "__main__":
    sys.exit(main())
