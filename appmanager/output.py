"""Capturing an app process's stdout and stderr into the core's log."""

from __future__ import annotations

import asyncio
import collections
import logging
import os

log = logging.getLogger("appmanager.app")

MAX_LINE = 16 * 1024


class OutputCapture:
    """Reads one process's output pipe and logs each line with the app and pid.

    Lives until the pipe reaches EOF (every holder of its write end has exited). Keeps the last
    lines for error pages.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, app_name: str) -> None:
        self._loop = loop
        self._fd = fd
        self._app = app_name
        self.pid = 0
        self._partial = b""
        self.tail: collections.deque[str] = collections.deque(maxlen=200)
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_readable)

    def text(self) -> str:
        """The last lines captured, for error pages."""
        self._drain()
        lines = list(self.tail)
        if self._partial:
            lines.append(self._partial.decode("utf-8", "replace"))
        return "\n".join(lines)

    def _drain(self) -> None:
        while self._fd >= 0 and self._read_once():
            pass

    def _on_readable(self) -> None:
        self._read_once()

    def _read_once(self) -> bool:
        """Read what the pipe holds now; False when nothing was there or the pipe is closed."""
        try:
            data = os.read(self._fd, 65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if not data:
            self.close()
            return False
        self._consume(data)
        return True

    def _consume(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        for raw in lines:
            self._emit(raw)

    def _emit(self, raw: bytes) -> None:
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        self.tail.append(line)
        log.info("[app %s pid %d] %s", self._app, self.pid, line)

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._partial:
            self._emit(self._partial)
            self._partial = b""
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
