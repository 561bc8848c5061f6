"""The responses the core writes itself: small, plain, correct HTTP.

The core answers a client directly only when no app process can: a refused request (4xx), no process
left to answer (502), a full wait-list (503), or an app that cannot boot (500 with an error page).
"""

from __future__ import annotations

import html
from http import HTTPStatus

from appmanager.spawnerror import SpawnError


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def simple_response(status: int, message: str = "", *, close: bool = True) -> bytes:
    """A complete HTTP/1.1 response with a one-line plain text body."""
    phrase = reason(status)
    body = f"{status} {phrase}\n{message + chr(10) if message else ''}".encode()
    return _response(status, "text/plain; charset=utf-8", body, close)


def html_response(status: int, body: str, *, close: bool = False) -> bytes:
    return _response(status, "text/html; charset=utf-8", body.encode(), close)


def _response(status: int, content_type: str, body: bytes, close: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status} {reason(status)}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def boot_error_page(app_name: str, error: SpawnError, *, details: bool) -> str:
    """The page for an app that could not be started; details only in development."""
    title = f"{html.escape(app_name)} could not be started"
    if not details:
        return (
            f"<!DOCTYPE html><html><head><title>{title}</title></head><body>"
            f"<h1>{title}</h1><p>The application failed to start. "
            "Details are in the server log.</p></body></html>"
        )
    parts = [
        f"<!DOCTYPE html><html><head><title>{title}</title></head><body>",
        f"<h1>{title}</h1>",
        f"<p>Step <b>{html.escape(error.step)}</b> failed: {html.escape(error.message)}</p>",
    ]
    if error.traceback:
        parts.append(f"<h2>Traceback</h2><pre>{html.escape(error.traceback)}</pre>")
    if error.output:
        parts.append(f"<h2>Output</h2><pre>{html.escape(error.output)}</pre>")
    parts.append("<p>This page shows details because the environment is development.</p>")
    parts.append("</body></html>")
    return "".join(parts)
