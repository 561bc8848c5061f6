"""A stand-in for the core on a Unix socket, for tests of what a module writes and reads.

Pointed at with ``appmanager_core_socket``, it records every request exactly as the module sent
it (head and body, and on which connection) and answers each with scripted bytes: a
Content-Length, chunked or close-delimited response, with or without ``Connection: close``.
The real core is tested end to end elsewhere; this one shows the protocol's details.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Received:
    """One request as the module sent it."""

    connection: int
    head: bytes
    body: bytes
    arrived: float = field(default_factory=time.monotonic)

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def headers(self) -> list[tuple[str, str]]:
        lines = self.head.decode("latin-1").split("\r\n")[1:]
        out = []
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                out.append((name, value.strip()))
        return out

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


@dataclass
class Reply:
    """What the fake core answers: raw response bytes, then whether it closes."""

    data: bytes
    close: bool = False


def ok(body: bytes = b"ok") -> Reply:
    return Reply(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class FakeCore:
    """Listens on ``path`` until closed; one thread per connection."""

    def __init__(self, path: Path, respond: Callable[[Received], Reply] | None = None) -> None:
        self.path = path
        self.respond = respond or (lambda received: ok())
        self.requests: list[Received] = []
        self.connections = 0
        self.head_arrived = threading.Event()
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        # nginx's workers (nobody, as root) connect
        os.chmod(path, 0o666)
        self._sock.listen(64)
        self._conns: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                self.head_arrived.set()
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                received = Received(number, head + b"\r\n\r\n", buf[:length])
                buf = buf[length:]
                with self._lock:
                    self.requests.append(received)
                reply = self.respond(received)
                conn.sendall(reply.data)
                if reply.close:
                    return
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self._closed = True
        try:
            # wakes the thread blocked in accept()
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join(5)
        try:
            os.unlink(self.path)
        except OSError:
            pass
