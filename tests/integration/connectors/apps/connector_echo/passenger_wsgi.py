"""A WSGI app for the connector tests: tells what reached it, streams slowly, reads its
environment, and checks uploads.

    /env?NAME          {"value": os.environ.get(NAME), "pid": ...}
    /stream?n=3&delay=0.5[&length=1]
                       n lines, delay seconds apart; chunked, or with Content-Length
    /big?mb=N          N MiB of a repeated pattern, with Content-Length
    anything else      the request as the app saw it, as JSON (the body as a digest)
"""

import hashlib
import json
import os
import time
from urllib.parse import parse_qs


def _json(start_response, data, status="200 OK"):
    body = json.dumps(data).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def _stream(environ, start_response):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    count = int(query.get("n", ["3"])[0])
    delay = float(query.get("delay", ["0.5"])[0])
    lines = [f"part {i} {time.time():.3f}\n".encode() for i in range(count)]
    headers = [("Content-Type", "text/plain")]
    if "length" in query:
        headers.append(("Content-Length", str(sum(len(line) for line in lines))))
    start_response("200 OK", headers)

    def generate():
        for i, line in enumerate(lines):
            if i:
                time.sleep(delay)
            yield line

    return generate()


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/env":
        name = environ.get("QUERY_STRING", "")
        return _json(start_response, {"value": os.environ.get(name), "pid": os.getpid()})
    if path == "/stream":
        return _stream(environ, start_response)
    if path == "/big":
        size = int(parse_qs(environ["QUERY_STRING"]).get("mb", ["1"])[0]) * 1024 * 1024
        block = bytes(range(256)) * 4096
        start_response(
            "200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))]
        )
        return (block for _ in range(size // len(block)))
    body = environ["wsgi.input"].read()
    headers = {
        key[5:].lower().replace("_", "-"): value
        for key, value in environ.items()
        if key.startswith("HTTP_")
    }
    return _json(
        start_response,
        {
            "method": environ["REQUEST_METHOD"],
            "request_uri": environ.get("REQUEST_URI"),
            "script_name": environ.get("SCRIPT_NAME", ""),
            "path_info": path,
            "query_string": environ.get("QUERY_STRING", ""),
            "headers": headers,
            "content_type": environ.get("CONTENT_TYPE"),
            "content_length": environ.get("CONTENT_LENGTH"),
            "remote_addr": environ.get("REMOTE_ADDR"),
            "remote_port": environ.get("REMOTE_PORT"),
            "server_name": environ.get("SERVER_NAME"),
            "server_port": environ.get("SERVER_PORT"),
            "scheme": environ["wsgi.url_scheme"],
            "body_length": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "pid": os.getpid(),
        },
    )
