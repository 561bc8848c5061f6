"""A failed spawn, as the shim or the core reported it (see docs/protocol/spawn.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpawnError(Exception):
    """Why a process could not be started: the step that failed, the error, the app's output.

    Kept by the Group until a spawn succeeds, to answer requests with an error page meanwhile.
    """

    step: str
    message: str
    traceback: str = ""
    output: str = ""

    def __str__(self) -> str:
        return f"{self.step} failed: {self.message}"
