"""The access log: combined format lines for requests served by apps and answered by the core."""

from __future__ import annotations

import re
import time
from pathlib import Path

from conftest import APPS, get, request

COMBINED = re.compile(
    r'^(?P<remote>\S+) - - \[(?P<time>[^\]]+)\] "(?P<request>[^"]*)" (?P<status>\d{3}|-) '
    r'(?P<size>\d+|-) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)"$'
)


def read_lines(path: Path, count: int, timeout: float = 5.0) -> list[re.Match[str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            matches = [COMBINED.match(line) for line in lines]
            assert all(matches), lines
            return [m for m in matches if m]
        time.sleep(0.1)
    raise AssertionError(f"expected {count} lines in {path}")


def test_access_log_lines(server_factory, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    server = server_factory(
        APPS / "generic_app", "--app-start-command", "python3 server.py", "--access-log", str(log)
    )
    raw = (
        b"GET /page?x=1 HTTP/1.1\r\nHost: t\r\nReferer: http://ref.test/\r\n"
        b"User-Agent: tester/1.0\r\nConnection: close\r\n\r\n"
    )
    assert request(server.port, raw).status == 200
    assert get(server.port, "/app/crash").status == 502
    first, second = read_lines(log, 2)
    assert first["remote"] == "127.0.0.1"
    assert first["request"] == "GET /page?x=1 HTTP/1.1"
    assert first["status"] == "200" and int(first["size"]) > 0
    assert first["referer"] == "http://ref.test/" and first["agent"] == "tester/1.0"
    assert second["request"] == "GET /app/crash HTTP/1.1" and second["status"] == "502"


def test_access_log_for_core_answers(server_factory, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    conf = tmp_path / "appmanager.toml"
    conf.write_text(f'[[app]]\nroot = "{APPS / "wsgi_echo"}"\nserver_names = ["known.test"]\n')
    server = server_factory(None, "--config", str(conf), "--access-log", str(log))
    raw = b"GET /x HTTP/1.1\r\nHost: unknown.test\r\nConnection: close\r\n\r\n"
    assert request(server.port, raw).status == 404
    (line,) = read_lines(log, 1)
    assert line["status"] == "404" and line["request"] == "GET /x HTTP/1.1"


def test_no_access_log_by_default(server_factory, tmp_path: Path) -> None:
    server = server_factory(APPS / "wsgi_echo")
    get(server.port)
    assert not list(tmp_path.glob("*access*"))
