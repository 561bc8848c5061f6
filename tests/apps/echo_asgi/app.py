"""A plain ASGI 3 app: echoes the scope and the request body as JSON.

Paths starting with /app/ exercise the server's side of the ASGI spec, like the WSGI echo app's
(streaming, errors, crashes, slow requests, output), and /ws is a WebSocket echo. The lifespan
startup puts ``started`` in the state every request scope gets a copy of; with
ECHO_ASGI_MARKERS set to a directory, startup and shutdown also leave a file there.
"""

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path

MARKERS = os.environ.get("ECHO_ASGI_MARKERS")
# What the last /app/disconnect request received after its response was sent.
after_response: list[str] = []
# What /app/grow holds on to, so that the process's private memory grows.
BALLAST: list[bytearray] = []


def jsonable(value):
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    return value


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await lifespan(scope, receive, send)
    elif scope["type"] == "websocket":
        await websocket_echo(scope, receive, send)
    else:
        await http(scope, receive, send)


async def lifespan(scope, receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            scope["state"]["started"] = True
            if MARKERS:
                Path(MARKERS, "startup").write_text(str(os.getpid()))
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if MARKERS:
                Path(MARKERS, "shutdown").write_text(str(os.getpid()))
            await send({"type": "lifespan.shutdown.complete"})
            return


async def respond(send, body, content_type=b"text/plain", status=200):
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type)],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def read_body(receive):
    pieces = []
    flags = []
    while True:
        message = await receive()
        assert message["type"] == "http.request", message
        pieces.append(message.get("body", b""))
        flags.append(message.get("more_body", False))
        if not message.get("more_body", False):
            return pieces, flags


async def conformance(scope, receive, send):
    """The answer every language's echo app gives at /conformance, for the shared suite."""
    pieces, _ = await read_body(receive)
    body = b"".join(pieces)
    headers = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    out = json.dumps(
        {
            "method": scope["method"],
            "path": scope["path"][len(scope["root_path"]) :],
            "query": scope["query_string"].decode("latin-1"),
            "headers": headers,
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
    ).encode()
    await respond(send, out, b"application/json")


async def http(scope, receive, send):
    path = scope["path"][len(scope["root_path"]) :]
    query = scope["query_string"].decode()
    if path == "/conformance":
        await conformance(scope, receive, send)
        return
    if path == "/app/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"line %d\n" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/app/stream-length":
        headers = [(b"content-length", b"10")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"01234", "more_body": True})
        await send({"type": "http.response.body", "body": b"56789"})
    elif path == "/app/big":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        chunk = b"z" * 65536
        for _ in range(int(query or "160")):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/app/raise":
        raise RuntimeError("echo app raised on purpose")
    elif path == "/app/raise-after-start":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("raised after the response began")
    elif path == "/app/no-response":
        return
    elif path == "/app/crash":
        os._exit(7)
    elif path == "/app/sleep":
        await asyncio.sleep(float(query or "1"))
        await respond(send, str(os.getpid()).encode())
    elif path == "/app/hello":
        await respond(send, b"hello world")
    elif path == "/app/pid":
        await respond(send, str(os.getpid()).encode())
    elif path == "/app/grow":
        BALLAST.append(bytearray(int(query or "50") * 1024 * 1024))
        await respond(send, str(os.getpid()).encode())
    elif path == "/app/print":
        print("hello from the app's stdout")
        print("and its stderr", file=sys.stderr)
        await respond(send, b"printed")
    elif path == "/app/status":
        await send({"type": "http.response.start", "status": int(query or "204"), "headers": []})
        await send({"type": "http.response.body", "body": b"ignored body"})
    elif path == "/app/connection-close":
        headers = [(b"connection", b"close"), (b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})
    elif path == "/app/bad-header":
        headers = [(b"x-bad", b"a\r\ninjected: yes")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"should not be sent"})
    elif path == "/app/file":
        start = {"type": "http.response.start", "status": 200, "headers": []}
        await send(start)
        await send({"type": "http.response.pathsend", "path": query})
    elif path == "/app/disconnect":
        # As Starlette listens for a disconnect while it streams: the listener must not hear
        # one before the response is over.
        after_response.clear()

        async def listen():
            await receive()  # the body
            after_response.append((await receive())["type"])

        listener = asyncio.ensure_future(listen())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"sent", "more_body": True})
        await asyncio.sleep(0.05)
        after_response.append("done" if listener.done() else "waiting")
        await send({"type": "http.response.body", "body": b""})
        await listener
    elif path == "/app/after-response":
        await respond(send, json.dumps(after_response).encode())
    else:
        pieces, flags = await read_body(receive)
        body = b"".join(pieces)
        data = jsonable({key: value for key, value in scope.items() if key != "state"})
        data["state"] = dict(scope.get("state", {}))
        data["extensions"] = sorted(scope.get("extensions") or {})
        data["pid"] = os.getpid()
        data["body"] = {
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "pieces": len(pieces),
            "more_body": flags,
        }
        await respond(send, json.dumps(data).encode(), b"application/json")


async def websocket_echo(scope, receive, send):
    """Echoes every message; "close" closes with 4000, "refuse" before accepting is a 403."""
    message = await receive()
    assert message["type"] == "websocket.connect", message
    path = scope["path"][len(scope["root_path"]) :]
    if path == "/ws/refuse":
        await send({"type": "websocket.close", "code": 1000})
        return
    if path == "/ws/raise":
        raise RuntimeError("websocket handler raised before accepting")
    offered = scope["subprotocols"]
    await send(
        {
            "type": "websocket.accept",
            "subprotocol": offered[0] if offered else None,
            "headers": [(b"x-echo", b"yes")],
        }
    )
    if path == "/ws/scope":
        data = jsonable({key: value for key, value in scope.items() if key != "state"})
        await send({"type": "websocket.send", "text": json.dumps(data)})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            if MARKERS:
                Path(MARKERS, "ws-disconnect").write_text(str(message["code"]))
            return
        if message.get("text") == "close":
            await send({"type": "websocket.close", "code": 4000, "reason": "asked to"})
            continue
        if message.get("text") == "raise":
            raise RuntimeError("websocket handler raised")
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"]})
