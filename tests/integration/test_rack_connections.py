"""Rack apps take whole connections through the core (handoff.md, "Whole connections" and "One
request at a time: giving connections back"): many requests on one connection, pipelined or not,
balanced per connection; a slow request does not hold up the other clients of its process, whose
idle connections are given back (``B``) and rerouted; a crash answers 502 where a request had
arrived; max_requests, max_request_time and the access log work on requests the core never sees;
a rolling restart gives the keep-alive connections back instead of closing them."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import APPS, HttpReader, Server, connect, get
from test_access_log import read_lines
from test_restarts import copy_app, old_pids_gone

ECHO = APPS / "echo_rack"
SINATRA = APPS / "sinatra_app"


def ask(sock: socket.socket, reader: HttpReader, path: str, host: str = "t") -> tuple[int, bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    response = reader.read()
    return response.status, response.body


def wait_until_ready(server: Server, count: int, timeout: float = 30.0) -> None:
    """Wait until ``count`` app processes have entered READY, so that balancing has a choice."""
    deadline = time.monotonic() + timeout
    while server.log().count("entered READY") < count:
        assert time.monotonic() < deadline, f"{count} processes not ready:\n{server.log()[-3000:]}"
        time.sleep(0.05)


@dataclass
class Held:
    """A keep-alive connection and the pid of the process that served its first request."""

    sock: socket.socket
    reader: HttpReader
    pid: bytes

    def ask(self, path: str) -> tuple[int, bytes]:
        return ask(self.sock, self.reader, path)


def hold(port: int) -> Held:
    sock = connect(port)
    reader = HttpReader(sock)
    status, pid = ask(sock, reader, "/app/pid")
    assert status == 200
    return Held(sock, reader, pid)


def closed_or_served_by_a_new_process(held: Held, old: bytes) -> None:
    """An idle connection of a process that died: closed without an answer, or kept by the core
    and served by another process; never a 502 for a request that was not sent."""
    held.sock.settimeout(1.0)
    try:
        data = held.sock.recv(100)
    except TimeoutError:
        held.sock.settimeout(15.0)
        status, pid = held.ask("/app/pid")
        assert status == 200 and pid != old
        return
    except ConnectionResetError:
        return
    assert data == b"", f"an idle connection got {data!r}"


def test_keep_alive_and_pipelining_on_one_connection(server_factory) -> None:
    server = server_factory(ECHO, "--min-instances", "2")
    with connect(server.port) as sock:
        reader = HttpReader(sock)
        pids = {ask(sock, reader, "/app/pid")[1] for _ in range(200)}
        sock.sendall(
            b"".join(b"GET /conformance?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(50))
        )
        queries = [json.loads(reader.read().body)["query"] for _ in range(50)]
        # Still usable after the pipelined burst.
        assert ask(sock, reader, "/app/pid") == (200, next(iter(pids)))
    assert queries == [f"n={i}" for i in range(50)]
    # One connection, one process: it is balanced as a whole.
    assert len(pids) == 1


def test_connections_are_balanced_to_the_process_with_fewest(server_factory) -> None:
    server = server_factory(ECHO, "--min-instances", "2", "--max-pool-size", "2")
    wait_until_ready(server, 2)
    first, second = hold(server.port), hold(server.port)
    with first.sock, second.sock:
        # Per request, both would go to the first idle process; per connection, the second
        # connection goes to the process that holds none.
        assert first.pid != second.pid
        for _ in range(5):
            assert first.ask("/app/pid") == (200, first.pid)
            assert second.ask("/app/pid") == (200, second.pid)
        first.sock.close()
        time.sleep(0.3)  # the process reports the connection closed (X)
        third = hold(server.port)
        with third.sock:
            assert third.pid == first.pid


def test_a_slow_request_does_not_hold_up_the_other_clients_of_its_process(server_factory) -> None:
    server = server_factory(ECHO, "--min-instances", "2", "--max-pool-size", "2")
    wait_until_ready(server, 2)
    held = [hold(server.port) for _ in range(6)]
    try:
        by_pid: dict[bytes, list[Held]] = {}
        for conn in held:
            by_pid.setdefault(conn.pid, []).append(conn)
        assert len(by_pid) == 2, f"connections not spread: {[c.pid for c in held]}"
        busy_pid, other_pid = list(by_pid)
        assert len(by_pid[busy_pid]) >= 2, f"connections not spread: {[c.pid for c in held]}"
        slow, *neighbours = by_pid[busy_pid]

        slow.sock.sendall(b"GET /app/sleep?1 HTTP/1.1\r\nHost: t\r\n\r\n")
        began = time.monotonic()
        time.sleep(0.2)  # the shim says busy (S) after 50 ms and gives back its idle connections
        for conn in neighbours:
            start = time.monotonic()
            status, pid = conn.ask("/app/pid")
            elapsed = time.monotonic() - start
            assert status == 200
            assert elapsed < 0.5, f"a neighbour of the slow request waited {elapsed:.2f} s"
            assert pid == other_pid, "a given-back connection must go to the free process"
        for conn in by_pid[other_pid]:
            start = time.monotonic()
            assert conn.ask("/app/pid") == (200, other_pid)
            assert time.monotonic() - start < 0.5
        # A new connection goes to the process that is not busy, although it holds more.
        start = time.monotonic()
        fresh = hold(server.port)
        with fresh.sock:
            assert time.monotonic() - start < 0.5
            assert fresh.pid == other_pid
        assert time.monotonic() - began < 1.0, "the checks above must run inside the slow request"

        response = slow.reader.read()
        assert response.status == 200 and response.body == busy_pid
        assert time.monotonic() - began >= 0.95
        # The slow request's connection stays with its process, and the process serves again.
        assert slow.ask("/app/pid") == (200, busy_pid)
        for conn in neighbours:
            assert conn.ask("/app/pid")[0] == 200
    finally:
        for conn in held:
            conn.sock.close()


def test_crash_with_a_request_in_flight_is_502_and_idle_connections_close(server_factory) -> None:
    server = server_factory(ECHO, "--max-pool-size", "1")
    idle = hold(server.port)
    with idle.sock, connect(server.port) as sock:
        reader = HttpReader(sock)
        assert ask(sock, reader, "/app/pid") == (200, idle.pid)
        # The second request on the connection crashes the process before it answers.
        assert ask(sock, reader, "/app/crash")[0] == 502
        closed_or_served_by_a_new_process(idle, idle.pid)
    server.wait_for_log("exited with status 7")
    assert get(server.port, "/app/pid").body != idle.pid
    # The app keeps serving on connections.
    again = hold(server.port)
    with again.sock:
        assert again.pid != idle.pid
        assert again.ask("/app/pid") == (200, again.pid)


def test_connections_given_back_before_a_crash_survive_it(server_factory) -> None:
    """A request that runs a while makes its process give back its idle connections; when the
    process then crashes, those connections are the core's and their requests go to its
    replacement."""
    server = server_factory(ECHO, "--max-pool-size", "1")
    idle = hold(server.port)
    with idle.sock, connect(server.port) as sock:
        reader = HttpReader(sock)
        assert ask(sock, reader, "/app/pid") == (200, idle.pid)
        sock.sendall(b"GET /app/sleep-crash?0.5 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.2)  # given back by now; its next request waits for a process
        status, pid = idle.ask("/app/pid")
        assert status == 200 and pid != idle.pid
        assert reader.read().status == 502
    server.wait_for_log("exited with status 7")


def test_max_requests_counts_requests_on_connections(server_factory) -> None:
    """Requests on a connection count towards max_requests: its process is retired and
    replaced, and gives the connection back, so that the client goes on on the same one."""
    server = server_factory(ECHO, "--max-requests", "20", "--max-pool-size", "1")
    pattern = r"process (\d+) retired: served (\d+) requests \(max_requests\)"
    pids: list[bytes] = []
    retired: list[tuple[str, str]] = []
    closed: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(pids) < 500:
        with connect(server.port) as sock:
            reader = HttpReader(sock)
            while time.monotonic() < deadline and len(pids) < 500:
                try:
                    status, pid = ask(sock, reader, "/app/pid")
                except (ConnectionError, OSError) as exc:
                    closed.append(f"after request {len(pids)}: {type(exc).__name__}: {exc}")
                    break
                assert status == 200
                pids.append(pid)
                if len(pids) % 10 == 0:
                    retired = re.findall(pattern, server.log())
                    if len(retired) >= 2 and len(set(pids)) >= 3:
                        break
        if len(retired) >= 2 and len(set(pids)) >= 3:
            break
    by_pid = Counter(pids)
    assert len(retired) >= 2, f"{retired}; requests by pid: {by_pid}\n{server.log()[-3000:]}"
    for _, count in retired:
        # The limit, its stagger, and what was in flight.
        assert 20 <= int(count) <= 25, f"{retired}; requests by pid: {by_pid}"
    assert len(by_pid) >= 3, by_pid
    # A retiring Ruby process gives its keep-alive connection back rather than closing it.
    assert not closed, f"the server closed the connection: {closed}"


def test_max_request_time_answers_504_on_a_connection(server_factory) -> None:
    server = server_factory(ECHO, "--max-request-time", "1", "--max-pool-size", "1")
    idle = hold(server.port)
    with idle.sock, connect(server.port) as sock:
        reader = HttpReader(sock)
        status, old = ask(sock, reader, "/app/pid")
        assert (status, old) == (200, idle.pid)
        start = time.monotonic()
        sock.sendall(b"GET /app/sleep?30 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.2)
        # Given back while the slow request runs, the idle connection's next request waits for
        # a process, and is served by the replacement of the killed one.
        idle.sock.sendall(b"GET /app/pid HTTP/1.1\r\nHost: t\r\n\r\n")
        assert reader.read().status == 504
        assert time.monotonic() - start < 5
        response = idle.reader.read()
        assert response.status == 200 and response.body != old
    log = server.wait_for_log(f"process {old.decode()} exited with signal 9")
    assert "a request took longer than 1 s (max_request_time)" in log
    assert get(server.port, "/app/pid").body != old


def test_every_request_on_a_connection_is_in_the_access_log(server_factory, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    server = server_factory(ECHO, "--access-log", str(log))
    with connect(server.port) as sock:
        reader = HttpReader(sock)
        for i in range(3):
            assert ask(sock, reader, f"/conformance?n={i}")[0] == 200
        sock.sendall(
            b"GET /app/status?404 HTTP/1.1\r\nHost: t\r\nReferer: http://ref.test/\r\n"
            b"User-Agent: ua/2\r\n\r\n"
        )
        assert reader.read().status == 404
        assert ask(sock, reader, "/app/hello") == (200, b"hello world")
    lines = read_lines(log, 5)
    assert [line["request"] for line in lines] == [
        "GET /conformance?n=0 HTTP/1.1",
        "GET /conformance?n=1 HTTP/1.1",
        "GET /conformance?n=2 HTTP/1.1",
        "GET /app/status?404 HTTP/1.1",
        "GET /app/hello HTTP/1.1",
    ]
    assert all(line["remote"] == "127.0.0.1" for line in lines)
    assert lines[3]["status"] == "404" and lines[3]["agent"] == "ua/2"
    assert lines[3]["referer"] == "http://ref.test/"
    assert lines[4]["status"] == "200" and lines[4]["size"] == str(len(b"hello world"))


@dataclass
class KeepAliveLoad:
    """Clients that each send requests in a loop on one keep-alive connection until stopped,
    counting every failure and every connection the server closed."""

    port: int
    path: str
    clients: int = 8
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    closed_by_server: int = 0
    pids: set[bytes] = field(default_factory=set)

    def start(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _client(self) -> None:
        sock: socket.socket | None = None
        reader: HttpReader | None = None
        deadline = time.monotonic() + 60  # bounded whatever happens
        while not self._stop.is_set() and time.monotonic() < deadline:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=20)
                reader = HttpReader(sock)
            assert reader is not None
            try:
                sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                resp = reader.read()
            except (ConnectionError, OSError) as exc:
                sock.close()
                sock = None
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            with self._lock:
                if resp.status == 200:
                    self.ok += 1
                    self.pids.add(resp.body)
                else:
                    self.failures.append(f"status {resp.status}: {resp.body[:100]!r}")
            if (resp.header("Connection") or "").lower() == "close":
                with self._lock:
                    self.closed_by_server += 1
                sock.close()
                sock = None
        if sock is not None:
            sock.close()


@pytest.mark.parametrize("kind", ["restart.txt", "command"])
def test_rolling_restart_keeps_keep_alive_connections(server_factory, tmp_path, kind) -> None:
    app = copy_app(tmp_path, "ruby")
    server = server_factory(app, "--min-instances", "2", "--max-pool-size", "6")
    wait_until_ready(server, 2)
    old = {p.pid for p in server.app_processes()}
    load = KeepAliveLoad(server.port, "/app/pid")
    load.start()
    try:
        time.sleep(0.7)
        if kind == "restart.txt":
            (app / "tmp" / "restart.txt").touch()
        else:
            result = subprocess.run(
                [sys.executable, "-m", "appmanager", "restart"]
                + ["--instance-dir", str(server.instance_dir)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stderr
        server.wait_for_log("restart finished", timeout=30)
        time.sleep(0.7)
    finally:
        load.stop()
    # Every request is answered, and no keep-alive connection is closed: the old processes give
    # them back (B) and the core hands them to the new ones.
    # A reset here is a keep-alive connection the server dropped: given back (B) by an old
    # process, it must be read again by the core, never closed.
    assert not load.failures, load.failures[:5]
    assert load.closed_by_server == 0
    assert load.ok > 50
    assert old_pids_gone(server, old), "old processes are still running"
    new = {p.pid for p in server.app_processes()}
    assert new and not new & old
    assert {int(pid) for pid in load.pids} & new, "no request reached a new process"
    assert get(server.port, "/app/pid").status == 200


def test_beside_other_apps_each_request_reaches_its_own(server_factory, tmp_path: Path) -> None:
    """Routed by host beside another app, a Rack app gets its requests one at a time: a
    connection's next request may be the other app's."""
    conf = tmp_path / "appmanager.toml"
    conf.write_text(
        f'[[app]]\nroot = "{APPS / "wsgi_echo"}"\nserver_names = ["wsgi.test"]\n\n'
        f'[[app]]\nroot = "{ECHO}"\nserver_names = ["rack.test"]\n'
    )
    server = server_factory(None, "--config", str(conf))
    with connect(server.port) as sock:
        reader = HttpReader(sock)
        for i in range(3):
            status, body = ask(sock, reader, f"/rack?{i}", host="rack.test")
            env = json.loads(body)
            assert status == 200 and "rack.version" in env
            assert env["PATH_INFO"] == "/rack" and env["HTTP_HOST"] == "rack.test"
            status, body = ask(sock, reader, f"/wsgi?{i}", host="wsgi.test")
            env = json.loads(body)
            assert status == 200 and "rack.version" not in env
            assert env["PATH_INFO"] == "/wsgi" and env["HTTP_HOST"] == "wsgi.test"
        # Pipelined across the two apps, answered in order.
        sock.sendall(
            b"GET /one HTTP/1.1\r\nHost: rack.test\r\n\r\n"
            b"GET /two HTTP/1.1\r\nHost: wsgi.test\r\n\r\n"
            b"GET /three HTTP/1.1\r\nHost: rack.test\r\n\r\n"
        )
        answers = [json.loads(reader.read().body) for _ in range(3)]
        assert [(a["PATH_INFO"], "rack.version" in a) for a in answers] == [
            ("/one", True),
            ("/two", False),
            ("/three", True),
        ]


def read_continue(sock: socket.socket) -> bytes:
    """Read an interim ``100 Continue``; return what followed it in the same read."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(100)
        assert chunk, "closed before 100 Continue"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head == b"HTTP/1.1 100 Continue", head
    return rest


def test_sinatra_on_a_connection(server_factory) -> None:
    server = server_factory(SINATRA, "--min-instances", "2", "--max-pool-size", "2")
    wait_until_ready(server, 2)
    with connect(server.port) as held, connect(server.port) as sock:
        held_pid = ask(held, HttpReader(held), "/pid")[1]
        reader = HttpReader(sock)
        status, pid = ask(sock, reader, "/pid")
        assert status == 200 and pid != held_pid, "the connection goes to the other process"

        assert ask(sock, reader, "/") == (200, b"Hello from Sinatra")
        assert ask(sock, reader, "/hello/rack") == (200, b"Hello, rack!")
        status, body = ask(sock, reader, "/search?q=conn&page=2")
        assert json.loads(body) == {"q": "conn", "page": 2, "script_name": ""}

        data = b'{"langs": ["ruby"], "n": 1}'
        sock.sendall(
            b"POST /json HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
        )
        assert json.loads(reader.read().body) == {
            "received": {"langs": ["ruby"], "n": 1},
            "content_length": str(len(data)),
        }
        # A chunked body, in two chunks.
        sock.sendall(
            b"POST /json HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (10, data[:10])
            + b"%x\r\n%s\r\n" % (len(data) - 10, data[10:])
            + b"0\r\n\r\n"
        )
        assert json.loads(reader.read().body)["received"] == {"langs": ["ruby"], "n": 1}
        # Expect: 100-continue, answered by the process that holds the connection.
        sock.sendall(
            b"POST /form HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 7\r\nExpect: 100-continue\r\n\r\n"
        )
        reader.buf = read_continue(sock)
        sock.sendall(b"name=am")
        assert json.loads(reader.read().body) == {"name": "am", "tags": None}

        # A streamed response (chunked), then the connection goes on.
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        stream = reader.read()
        assert stream.status == 200 and stream.body == b"first;second;third"
        assert "chunked" in (stream.header("Transfer-Encoding") or "").lower()
        assert ask(sock, reader, "/halt") == (403, b"forbidden here")
        assert ask(sock, reader, "/nope") == (404, b"custom not found")
        status, body = ask(sock, reader, "/error")
        assert status == 500 and b"sinatra route failed" in body

        # Pipelined, in order.
        sock.sendall(
            b"GET /hello/a HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /hello/b HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        assert [reader.read().body for _ in range(3)] == [
            b"Hello, a!",
            b"first;second;third",
            b"Hello, b!",
        ]
        # Every request on the connection was served by its process.
        assert ask(sock, reader, "/pid") == (200, pid)
