"""Hello-world WSGI app used by the benchmarks (stdlib only, no framework)."""

from collections.abc import Callable, Iterable

BODY = b"Hello, world!\n"
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]


def application(
    environ: dict[str, object], start_response: Callable[..., object]
) -> Iterable[bytes]:
    """Answer every request with a fixed 14-byte plain-text body."""
    start_response("200 OK", list(HEADERS))
    return [BODY]
