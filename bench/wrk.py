"""Running wrk and parsing its report."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass

_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_REQUESTS_RE = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.M)
_RPS_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_PERCENTILE_RE = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_NON_2XX_RE = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_ERRORS_RE = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)


class WrkError(RuntimeError):
    """wrk failed or printed a report this module cannot read."""


@dataclass(frozen=True)
class WrkResult:
    """The figures of one wrk run."""

    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int

    def to_dict(self) -> dict[str, float | int]:
        """A JSON-ready dict."""
        return asdict(self)


def _seconds(value: str, unit: str) -> float:
    return float(value) * _UNITS_S[unit]


def parse_wrk(output: str) -> WrkResult:
    """Parse the report of `wrk --latency`."""
    requests = _REQUESTS_RE.search(output)
    rps = _RPS_RE.search(output)
    percentiles = {m[1]: _seconds(m[2], m[3]) for m in _PERCENTILE_RE.finditer(output)}
    if requests is None or rps is None or "99" not in percentiles:
        raise WrkError(f"cannot parse wrk output:\n{output}")
    non_2xx = _NON_2XX_RE.search(output)
    errors = _SOCKET_ERRORS_RE.search(output)
    return WrkResult(
        requests=int(requests[1]),
        duration_s=_seconds(requests[2], requests[3]),
        rps=float(rps[1]),
        p50_ms=percentiles.get("50", float("nan")) * 1e3,
        p99_ms=percentiles["99"] * 1e3,
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
    )


def wrk_path() -> str | None:
    """Absolute path of wrk, or None when it is not installed."""
    return shutil.which("wrk")


def run_wrk(url: str, duration_s: int, connections: int, threads: int = 1) -> WrkResult:
    """Run `wrk -tT -cC -dDs --latency URL` (bounded by a timeout) and parse its report."""
    wrk = wrk_path()
    if wrk is None:
        raise WrkError("`wrk` is not on PATH")
    cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency", url]
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=duration_s + 30, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish within {duration_s + 30:g} s") from exc
    if result.returncode != 0:
        raise WrkError(f"wrk exited with {result.returncode}: {result.stderr or result.stdout}")
    return parse_wrk(result.stdout)
