"""A WSGI app whose every request takes 0.5 s (stdlib only): bench/lifecycle.py's burst.

The answer names the process that served it (`X-Pid`), so that the benchmark can count the
processes a burst of requests was spread over.
"""

import os
import time
from collections.abc import Callable, Iterable

SECONDS = 0.5
BODY = b"Hello, world!\n"


def application(
    environ: dict[str, object], start_response: Callable[..., object]
) -> Iterable[bytes]:
    """Sleep 0.5 s, then answer the fixed 14-byte body."""
    time.sleep(SECONDS)
    start_response(
        "200 OK",
        [
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(BODY))),
            ("X-Pid", str(os.getpid())),
        ],
    )
    return [BODY]
