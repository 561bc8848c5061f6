"""Echoes the WSGI environ and the request body as JSON; the conformance cases compare it.

Paths starting with /app/ exercise the server's side of PEP 3333 (streaming, write(), exc_info,
file_wrapper, close(), crashes).
"""

import json
import os
import sys
import time

CLOSE_MARKER = os.environ.get("ECHO_CLOSE_MARKER")
BALLAST: list[bytearray] = []


class Closing:
    """An iterable whose close() the server must call."""

    def __init__(self, parts):
        self.parts = parts

    def __iter__(self):
        return iter(self.parts)

    def close(self):
        if CLOSE_MARKER:
            with open(CLOSE_MARKER, "a") as f:
                f.write("closed\n")


def conformance(environ, start_response):
    """The answer every language's echo app gives at /conformance, for the shared suite."""
    import hashlib

    body = environ["wsgi.input"].read()
    headers = {
        key[5:].lower().replace("_", "-"): value
        for key, value in environ.items()
        if key.startswith("HTTP_")
    }
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.lower().replace("_", "-")] = environ[key]
    out = json.dumps(
        {
            "method": environ["REQUEST_METHOD"],
            "path": environ["PATH_INFO"],
            "query": environ.get("QUERY_STRING", ""),
            "headers": headers,
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
    ).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(out)))]
    )
    return [out]


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/conformance":
        return conformance(environ, start_response)
    if path == "/app/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (f"line {i}\n".encode() for i in range(3))
    if path == "/app/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")
        return [b"and returned\n"]
    if path == "/app/file":
        start_response("200 OK", [("Content-Type", "text/x-python")])
        return environ["wsgi.file_wrapper"](open(__file__, "rb"))
    if path == "/app/close":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Closing([b"a", b"b"])
    if path == "/app/raise":
        raise RuntimeError("echo app raised on purpose")
    if path == "/app/crash":
        os._exit(7)
    if path == "/app/sleep":
        time.sleep(float(environ.get("QUERY_STRING") or "1"))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    if path == "/app/grow":
        # Hold on to this many MB, so that the process's private memory grows.
        BALLAST.append(bytearray(int(environ.get("QUERY_STRING") or "50") * 1024 * 1024))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    if path == "/app/env":
        # One variable of the process environment (env_var settings reach it).
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [os.environ.get(environ.get("QUERY_STRING", ""), "(unset)").encode()]
    if path == "/app/pid":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    if path == "/app/print":
        print("hello from the app's stdout")
        print("and its stderr", file=sys.stderr)
        environ["wsgi.errors"].write("wsgi.errors line\n")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"printed"]
    if path == "/app/exc_info":
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("replaced")
        except ValueError:
            start_response(
                "500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info()
            )
        return [b"error page from the app"]
    if path == "/app/status":
        code = environ.get("QUERY_STRING") or "204"
        start_response(f"{code} Custom", [])
        return []
    body = environ["wsgi.input"].read()
    keys = {
        k: v
        for k, v in environ.items()
        if isinstance(v, (str, int, bool, tuple)) and k != "wsgi.version"
    }
    keys["wsgi.version"] = list(environ["wsgi.version"])
    keys["body"] = body.decode("latin-1")
    keys["pid"] = os.getpid()
    out = json.dumps(keys).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(out)))]
    )
    return [out]
