"""A generic app: a plain program that serves HTTP on $PORT (what --app-start-command runs)."""

import hashlib
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _echo(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path.startswith("/app/crash"):
            os._exit(7)
        if self.path.startswith("/app/raise"):
            self._reply(500, b"internal error\n", "text/plain")
            return
        if self.path.startswith("/app/sleep"):
            time.sleep(float(self.path.partition("?")[2] or "1"))
        if self.path.split("?")[0] == "/conformance":
            path, _, query = self.path.partition("?")
            headers: dict[str, str] = {}
            for name, value in self.headers.items():
                key = name.lower()
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
            out = {
                "method": self.command,
                "path": path,
                "query": query,
                "headers": headers,
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
            }
            self._reply(200, json.dumps(out).encode())
            return
        if self.path.startswith("/app/stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                chunk = f"line {i}\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
            return
        data = {
            "method": self.command,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "pid": os.getpid(),
            "env": os.environ.get("GENERIC_GREETING", ""),
        }
        self._reply(200, json.dumps(data).encode())

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _echo

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write("generic app: " + format % args + "\n")


if __name__ == "__main__":
    port = int(os.environ["PORT"])
    print(f"generic app listening on {port}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
