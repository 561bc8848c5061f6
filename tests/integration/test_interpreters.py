"""--python, --ruby and --nodejs pick the interpreter; a missing one is a clear boot error."""

from __future__ import annotations

import json
import shutil
import sys

from conftest import APPS, get


def test_python_option_picks_the_interpreter(server_factory, tmp_path) -> None:
    app = tmp_path / "which"
    app.mkdir()
    (app / "passenger_wsgi.py").write_text(
        "import sys\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [sys.executable.encode()]\n"
    )
    # A symlink is a different path to the same interpreter: the app must report that path.
    link = tmp_path / "python-for-app"
    link.symlink_to(sys.executable)
    server = server_factory(app, "--python", str(link))
    assert get(server.port).body == str(link).encode()


def test_missing_interpreters_are_clear_boot_errors(server_factory) -> None:
    for app, option in (
        ("echo_rack", "--ruby"),
        ("echo_node", "--nodejs"),
        ("wsgi_echo", "--python"),
    ):
        server = server_factory(APPS / app, option, "/nonexistent/interpreter")
        assert f"/nonexistent/interpreter not found (set its path with {option})" in server.banner
        assert get(server.port).status == 500
        server.stop()


def test_ruby_option(server_factory) -> None:
    ruby = shutil.which("ruby")
    assert ruby is not None
    server = server_factory(APPS / "echo_rack", "--ruby", ruby)
    assert json.loads(get(server.port).body)["REQUEST_METHOD"] == "GET"
