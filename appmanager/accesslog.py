"""The access log: one line per request in the combined log format.

Off by default in standalone mode (``--access-log FILE`` turns it on). Lines are buffered and
flushed at least once a second by the core's sweep, so that logging costs one write call per batch
rather than per request; SIGUSR1 reopens the file like the other logs.
"""

from __future__ import annotations

import time
from typing import IO


def _header(head: bytes, name: bytes) -> str | None:
    """One header's value from a raw head, for the log only (first occurrence)."""
    start = head.lower().find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    end = head.find(b"\r\n", start)
    return head[start:end].strip().decode("latin-1")


def _quoted(value: str | None) -> str:
    """A field of the line between its quotes: "-" when absent or empty, quotes escaped, and no
    line breaks (a line's fields may come from an app process)."""
    if not value:
        return "-"
    if "\n" in value or "\r" in value:
        value = value.replace("\r", " ").replace("\n", " ")
    return value.replace('"', '\\"')


class AccessLog:
    """An open access log file; lives as long as the core."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._lines: list[str] = []
        self._open()

    def _open(self) -> None:
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open)

    def record(self, remote: str, head: bytes, status: int | None, size: int | None) -> None:
        """Queue one request's line from its raw head (``status``/``size`` None: not known,
        written as -)."""
        self.record_line(
            remote,
            head[: head.find(b"\r\n")].decode("latin-1"),
            status,
            size,
            _header(head, b"referer"),
            _header(head, b"user-agent"),
        )

    def record_line(
        self,
        remote: str,
        request_line: str,
        status: int | None,
        size: int | None,
        referer: str | None,
        agent: str | None,
    ) -> None:
        """Queue one request's line from its parts (None or "": not known, written as -)."""
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z")
        self._lines.append(
            f'{remote} - - [{stamp}] "{_quoted(request_line)}" {status if status else "-"} '
            f'{size if size is not None else "-"} "{_quoted(referer)}" "{_quoted(agent)}"\n'
        )
        if len(self._lines) >= 256:
            self.flush()

    def flush(self) -> None:
        if self._lines and self._file is not None:
            self._file.write("".join(self._lines))
            self._file.flush()
            self._lines.clear()

    def reopen(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
        self._open()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
