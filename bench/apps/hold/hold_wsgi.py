"""The Django test project behind a hold endpoint, for bench/lifecycle.py's growth runs.

bench/lifecycle.py copies tests/apps/django_project to a temp dir and puts this file next to its
manage.py, as the app's startup file. Every request goes to Django, but `GET /__bench/hold`:

1. writes `bench-arrivals/PID.arrived` (the time it arrived, `time.time()`);
2. serves 20 Django requests in-process (`/` and `/info/`), so that the process has done real
   work before its memory is measured, and writes `bench-arrivals/PID.warmed`;
3. waits while the file `bench-hold` exists (at most 120 s), keeping the process busy, so that
   the server has to spawn a new process for the next request;
4. answers its pid.
"""

import importlib
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

ROOT = os.path.dirname(os.path.abspath(__file__))
HOLD_FILE = os.path.join(ROOT, "bench-hold")
ARRIVALS = os.path.join(ROOT, "bench-arrivals")
WARM_PATHS = ("/", "/info/")
WARM_REQUESTS = 20
MAX_HOLD_S = 120.0

sys.path.insert(0, ROOT)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
django_app: Callable[..., Iterable[bytes]] = importlib.import_module("mysite.wsgi").application


def _mark(kind: str) -> None:
    """Write ARRIVALS/PID.KIND holding the time, atomically (a reader never sees it empty)."""
    path = os.path.join(ARRIVALS, f"{os.getpid()}.{kind}")
    with open(path + ".tmp", "w") as f:
        f.write(repr(time.time()))
    os.replace(path + ".tmp", path)


def _ignore_start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    """start_response for the in-process warm-up requests."""


def _serve(environ: dict[str, Any], path: str) -> None:
    """One in-process GET `path` through Django, its body read and closed."""
    body = django_app(dict(environ, PATH_INFO=path, QUERY_STRING=""), _ignore_start)
    try:
        for _chunk in body:
            pass
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


def application(environ: dict[str, Any], start_response: Callable[..., object]) -> Iterable[bytes]:
    """Django, and the hold endpoint."""
    if environ.get("PATH_INFO") != "/__bench/hold":
        return django_app(environ, start_response)
    _mark("arrived")
    for i in range(WARM_REQUESTS):
        _serve(environ, WARM_PATHS[i % len(WARM_PATHS)])
    _mark("warmed")
    deadline = time.monotonic() + MAX_HOLD_S
    while os.path.exists(HOLD_FILE) and time.monotonic() < deadline:
        time.sleep(0.01)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"{os.getpid()}\n".encode()]
