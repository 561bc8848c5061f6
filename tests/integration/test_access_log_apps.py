"""The access log for responses apps write themselves: the status and body size that Python and
Ruby processes report in D, and that Node processes report in APPMANAGER_LOG (handoff.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import APPS, get, request
from test_access_log import read_lines

APPS_BY_LANGUAGE = [
    pytest.param("wsgi_echo", id="wsgi"),
    pytest.param("echo_asgi", id="asgi"),
    pytest.param(
        "echo_rack",
        id="rack",
        marks=pytest.mark.skipif(shutil.which("ruby") is None, reason="no ruby on PATH"),
    ),
    pytest.param(
        "echo_node",
        id="node",
        marks=pytest.mark.skipif(shutil.which("node") is None, reason="no node on PATH"),
    ),
]


@pytest.mark.parametrize("app", APPS_BY_LANGUAGE)
def test_app_responses_are_logged_with_status_and_size(
    server_factory, tmp_path: Path, app: str
) -> None:
    log = tmp_path / "access.log"
    server = server_factory(APPS / app, "--access-log", str(log))
    raw = (
        b"GET /hello?x=1 HTTP/1.1\r\nHost: t\r\nReferer: http://ref.test/from\r\n"
        b"User-Agent: tester/1.0\r\nConnection: close\r\n\r\n"
    )
    page = request(server.port, raw)
    assert page.status == 200
    streamed = get(server.port, "/app/stream")
    assert streamed.status == 200 and streamed.header("Transfer-Encoding") == "chunked"
    failed = get(server.port, "/app/raise")
    assert failed.status == 500
    first, second, third = read_lines(log, 3)

    assert first["remote"] == "127.0.0.1"
    assert first["request"] == "GET /hello?x=1 HTTP/1.1"
    assert (first["status"], first["size"]) == ("200", str(len(page.body)))
    assert first["referer"] == "http://ref.test/from"
    assert first["agent"] == "tester/1.0"
    # The body's bytes, not the chunks' framing.
    assert second["request"] == "GET /app/stream HTTP/1.1"
    assert (second["status"], second["size"]) == ("200", str(len(streamed.body)))
    assert (second["referer"], second["agent"]) == ("-", "-")
    assert third["request"] == "GET /app/raise HTTP/1.1"
    assert (third["status"], third["size"]) == ("500", str(len(failed.body)))


@pytest.mark.parametrize("app", APPS_BY_LANGUAGE)
def test_head_is_logged_without_a_body(server_factory, tmp_path: Path, app: str) -> None:
    log = tmp_path / "access.log"
    server = server_factory(APPS / app, "--access-log", str(log))
    raw = b"HEAD /app/stream HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    assert request(server.port, raw, head_only=True).status == 200
    (line,) = read_lines(log, 1)
    assert line["request"] == "HEAD /app/stream HTTP/1.1"
    assert (line["status"], line["size"]) == ("200", "0")
