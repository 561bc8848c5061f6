"""``--pid-file``: the serving process's pid, written while it serves and removed when it stops."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def pid_file(path: str | None) -> Iterator[None]:
    """Write this process's pid to ``path`` (nothing when None) for the ``with`` block."""
    if path:
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass
