"""Apps whose processes take whole connections through the core (handoff.md, "Whole
connections"), ASGI (``tests/apps/echo_asgi``) and Rack (``tests/apps/echo_rack``), each test on
both: many requests on one connection, pipelined or not, balanced per connection; a crash answers
502 where a request had arrived; max_requests, max_request_time and the access log work on requests
the core never sees.

Where the two differ, it is in what becomes of a process's idle connections: an ASGI process serves
them alongside a long request and closes them when it goes; a Rack process, one request at a time,
gives them back to the core (``B``) when a request runs long, when it stops and when it retires.
What only one of them does is tested in test_asgi_connections.py and test_rack_connections.py.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import APPS, HttpReader, Server, connect, get
from test_access_log import read_lines
from test_restarts import Load, assert_restarted_failing_nothing, copy_app, restart_under


@dataclass(frozen=True)
class App:
    root: Path
    # Whether its processes give their other connections back to the core while a request runs
    # long (Rack, one request at a time), rather than serve them alongside it (ASGI). Both give
    # them back when they stop; a process that is killed closes those it still holds.
    gives_back_when_busy: bool


@pytest.fixture(
    params=[
        App(APPS / "echo_asgi", gives_back_when_busy=False),
        App(APPS / "echo_rack", gives_back_when_busy=True),
    ],
    ids=["echo_asgi", "echo_rack"],
)
def app(request: pytest.FixtureRequest) -> App:
    chosen: App = request.param
    return chosen


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


def test_keep_alive_and_pipelining_on_one_connection(server_factory, app: App) -> None:
    server = server_factory(app.root, "--min-instances", "2")
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


def test_connections_are_balanced_to_the_process_with_fewest(server_factory, app: App) -> None:
    server = server_factory(app.root, "--min-instances", "2", "--max-pool-size", "2")
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


def test_crash_with_a_request_in_flight_is_502_and_idle_connections_close(
    server_factory, app: App
) -> None:
    server = server_factory(app.root, "--max-pool-size", "1")
    idle = hold(server.port)
    with idle.sock, connect(server.port) as sock:
        reader = HttpReader(sock)
        assert ask(sock, reader, "/app/pid") == (200, idle.pid)
        # The second request on the connection crashes the process before it answers.
        assert ask(sock, reader, "/app/crash")[0] == 502
        if app.gives_back_when_busy:
            closed_or_served_by_a_new_process(idle, idle.pid)
        else:
            assert idle.sock.recv(100) == b""  # idle between requests: closed, no 502
    server.wait_for_log("exited with status 7")
    assert get(server.port, "/app/pid").body != idle.pid
    # The app keeps serving on connections.
    again = hold(server.port)
    with again.sock:
        assert again.pid != idle.pid
        assert again.ask("/app/pid") == (200, again.pid)


def test_max_requests_counts_requests_on_connections(server_factory, app: App) -> None:
    """Requests on a connection count towards max_requests: its process is retired and
    replaced. A retiring process gives the connection back after its response, so that the
    client goes on on the same one."""
    server = server_factory(app.root, "--max-requests", "20", "--max-pool-size", "1")
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
    assert not closed, f"the server closed the connection: {closed}"


def test_max_request_time_answers_504_on_a_connection(server_factory, app: App) -> None:
    server = server_factory(app.root, "--max-request-time", "1", "--max-pool-size", "1")
    idle = hold(server.port)
    with idle.sock, connect(server.port) as sock:
        reader = HttpReader(sock)
        status, old = ask(sock, reader, "/app/pid")
        assert (status, old) == (200, idle.pid)
        start = time.monotonic()
        sock.sendall(b"GET /app/sleep?30 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.2)
        # While the slow request runs, an ASGI process serves the idle connection's next request
        # alongside it; a Rack process gave the connection back, and its request waits for a
        # process: the replacement of the killed one.
        idle.sock.sendall(b"GET /app/pid HTTP/1.1\r\nHost: t\r\n\r\n")
        assert reader.read().status == 504
        assert time.monotonic() - start < 5
        response = idle.reader.read()
        assert response.status == 200
        assert (response.body != old) == app.gives_back_when_busy
        if not app.gives_back_when_busy:
            assert idle.sock.recv(100) == b""  # idle in the killed process: closed
    log = server.wait_for_log(f"process {old.decode()} exited with signal 9")
    assert "a request took longer than 1 s (max_request_time)" in log
    assert get(server.port, "/app/pid").body != old


def test_every_request_on_a_connection_is_in_the_access_log(
    server_factory, app: App, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    server = server_factory(app.root, "--access-log", str(log))
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


@pytest.mark.parametrize("kind", ["restart.txt", "command"])
@pytest.mark.parametrize("language", ["asgi", "ruby"])
def test_rolling_restart_keeps_keep_alive_connections(
    server_factory, tmp_path, kind, language
) -> None:
    app = copy_app(tmp_path, language)
    server = server_factory(app, "--min-instances", "2", "--max-pool-size", "6")
    wait_until_ready(server, 2)
    old = {p.pid for p in server.app_processes()}
    # No retry: a keep-alive connection the server drops is a failure here.
    load = Load(server.port, "/app/pid", retry=False)
    restart_under(load, kind, server, app)
    # Every request is answered, and no keep-alive connection is closed: the old processes give
    # them back (B) and the core hands them to the new ones.
    # A reset here is a keep-alive connection the server dropped: given back (B) by an old
    # process, it must be read again by the core, never closed.
    new = assert_restarted_failing_nothing(load, server, old)
    assert load.closed_by_server == 0
    assert {int(pid) for pid in load.pids} & new, "no request reached a new process"
