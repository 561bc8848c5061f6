"""The balancer and the wait-list: least-busy routing, growth under load, overflow answered 503."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import APPS, get


def concurrent_gets(port: int, paths: list[str], stagger: float = 0.0) -> list:
    def one(path: str):
        return get(port, path, timeout=30)

    with ThreadPoolExecutor(len(paths)) as pool:
        futures = []
        for path in paths:
            futures.append(pool.submit(one, path))
            time.sleep(stagger)
        return [f.result() for f in futures]


def test_slow_requests_spread_over_processes(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--min-instances", "3", "--max-pool-size", "3")
    start = time.monotonic()
    responses = concurrent_gets(server.port, ["/app/sleep?1"] * 3)
    elapsed = time.monotonic() - start
    pids = {r.body for r in responses}
    assert len(pids) == 3, "each slow request should get its own process"
    assert elapsed < 2.5, f"requests were not served in parallel ({elapsed:.1f} s)"


def test_busy_processes_make_the_pool_grow(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--min-instances", "1", "--max-pool-size", "3")
    assert len(server.app_pids) == 1
    responses = concurrent_gets(server.port, ["/app/sleep?1.5"] * 3, stagger=0.1)
    assert all(r.status == 200 for r in responses)
    assert len({r.body for r in responses}) >= 2
    assert server.log().count("entered READY") >= 2
    assert len(server.app_processes()) <= 3


def test_pool_never_exceeds_max_pool_size(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--min-instances", "1", "--max-pool-size", "2")
    responses = concurrent_gets(server.port, ["/app/sleep?0.5"] * 6)
    assert all(r.status == 200 for r in responses)
    assert len({r.body for r in responses}) <= 2
    assert server.log().count("entered READY") <= 2


def test_full_wait_list_answers_503_at_once(server_factory) -> None:
    server = server_factory(
        APPS / "wsgi_echo",
        "--min-instances",
        "1",
        "--max-pool-size",
        "1",
        "--max-request-queue-size",
        "1",
    )
    results: dict[str, object] = {}

    def slow(name: str) -> None:
        results[name] = get(server.port, "/app/sleep?1.5", timeout=30)

    first = threading.Thread(target=slow, args=("served",))
    first.start()
    time.sleep(0.3)
    second = threading.Thread(target=slow, args=("queued",))
    second.start()
    time.sleep(0.3)
    start = time.monotonic()
    overflow = get(server.port, "/app/pid")
    assert overflow.status == 503
    assert time.monotonic() - start < 0.5, "overflow must be answered at once"
    assert b"request queue full" in overflow.body
    first.join()
    second.join()
    assert results["served"].status == 200  # type: ignore[attr-defined]
    assert results["queued"].status == 200  # type: ignore[attr-defined]
    assert "request queue full (1), answering 503" in server.log()


def test_unlimited_wait_list(server_factory) -> None:
    server = server_factory(
        APPS / "wsgi_echo", "--max-pool-size", "1", "--max-request-queue-size", "0"
    )
    responses = concurrent_gets(server.port, ["/app/sleep?0.1"] * 20)
    assert all(r.status == 200 for r in responses)


def test_least_busy_prefers_an_idle_process(server_factory) -> None:
    server = server_factory(APPS / "wsgi_echo", "--min-instances", "2", "--max-pool-size", "2")
    results = []

    def slow() -> None:
        results.append(get(server.port, "/app/sleep?1.5").body)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)
    # While one process is busy, quick requests all go to the other one without waiting.
    start = time.monotonic()
    quick = {get(server.port, "/app/pid").body for _ in range(5)}
    assert time.monotonic() - start < 1.0
    t.join()
    assert len(quick) == 1
    assert quick != {results[0]}
