"""The WSGI conformance suite: raw request bytes in, expected environ and response out.

Each case is a pair of data files in ``wsgi_cases/``: ``NAME.http`` holds the request (its line ends
become CRLF when loaded) and ``NAME.json`` what must come back. The app is ``apps/wsgi_echo``, which
echoes its environ as JSON; ``"from_core": true`` marks requests the core must refuse itself, before
any app sees them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import APPS, Server, request, start_server

CASES = Path(__file__).resolve().parent / "wsgi_cases"
CASE_NAMES = sorted(p.stem for p in CASES.glob("*.http"))


def load(name: str) -> tuple[bytes, dict[str, Any]]:
    raw = (CASES / f"{name}.http").read_bytes().replace(b"\n", b"\r\n")
    expected = json.loads((CASES / f"{name}.json").read_text())
    return raw, expected


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(APPS / "wsgi_echo", tmp_path=tmp_path_factory.mktemp("conformance"))
    yield server
    server.stop()
    assert server.proc.stdout is not None
    server.proc.stdout.close()


def test_there_are_cases() -> None:
    assert len(CASE_NAMES) >= 20


@pytest.mark.parametrize("name", CASE_NAMES)
def test_case(name: str, echo_server: Server) -> None:
    raw, expected = load(name)
    resp = request(echo_server.port, raw, head_only=expected.get("head", False))
    assert resp.status == expected["status"], resp.body[:500]
    if expected.get("from_core"):
        # The core's own answer: a plain page naming the status, and the connection closed.
        assert resp.body.startswith(f"{expected['status']} ".encode())
        assert resp.header("Connection") == "close"
        return
    if "response_version" in expected:
        assert resp.version == expected["response_version"]
    for key, value in expected.get("headers", {}).items():
        assert resp.header(key) == value, key
    for key in expected.get("no_headers", []):
        assert resp.header(key) is None, key
    if "body" in expected:
        assert resp.body.decode("latin-1") == expected["body"]
    if "body_file" in expected:
        assert resp.body == (CASES / expected["body_file"]).read_bytes()
    if "body_lacks" in expected:
        assert expected["body_lacks"].encode() not in resp.body
    if "environ" in expected or "absent" in expected:
        environ = json.loads(resp.body)
        for key, value in expected.get("environ", {}).items():
            assert environ.get(key) == value, key
        for key in expected.get("absent", []):
            assert key not in environ, key


def test_server_port_and_remote_port(echo_server: Server) -> None:
    resp = request(echo_server.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    environ = json.loads(resp.body)
    assert environ["SERVER_PORT"] == str(echo_server.port)
    assert int(environ["REMOTE_PORT"]) > 0
