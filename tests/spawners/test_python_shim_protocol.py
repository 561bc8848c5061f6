"""The Python shim driven over its real protocols (docs/protocol/spawn.md, handoff.md).

The test plays the core (python_shim.py): it starts the shim with the control channel on fd 3 and
the progress file on fd 4, does the handshake, and hands it real loopback TCP connections by
SCM_RIGHTS. The client's end reads the response the shim writes straight to it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from python_shim import TIMEOUT, Shim, http_head, parse_response, spawner, start_shim

ECHO_APP = textwrap.dedent(
    '''
    """A WSGI app for the shim's tests; the X-Mode request header picks what it does."""
    import hashlib
    import io
    import json
    import os
    import sys
    import time

    print("echo app loaded", flush=False)


    def application(environ, start_response):
        return MODES[environ.get("HTTP_X_MODE", "echo")](environ, start_response)


    def read_body(environ):
        stream = environ["wsgi.input"]
        how = environ.get("HTTP_X_READ", "read")
        pieces = []
        if how == "read":
            pieces = [stream.read()]
        elif how == "read-n":
            while chunk := stream.read(1000):
                pieces.append(chunk)
        elif how == "readline":
            while line := stream.readline():
                pieces.append(line)
        elif how == "readline-limit":
            while line := stream.readline(4):
                pieces.append(line)
        elif how == "readlines":
            pieces = stream.readlines(10)
            pieces += stream.readlines()
        elif how == "iter":
            pieces = list(stream)
        return pieces, stream.read()


    def echo(environ, start_response):
        pieces, after = read_body(environ)
        body = b"".join(pieces)
        data = {key: value for key, value in environ.items() if isinstance(value, str)}
        data["module"] = __name__
        data["wsgi"] = {
            "version": list(environ["wsgi.version"]),
            "multithread": environ["wsgi.multithread"],
            "multiprocess": environ["wsgi.multiprocess"],
            "run_once": environ["wsgi.run_once"],
            "input_terminated": environ["wsgi.input_terminated"],
            "errors_is_stderr": environ["wsgi.errors"] is sys.stderr,
            "file_wrapper": environ["wsgi.file_wrapper"].__name__,
        }
        data["body"] = {
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "pieces": len(pieces),
            "first": [p.decode("latin-1") for p in pieces[:4]],
            "after": len(after),
        }
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(data).encode()]


    def hello(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello world"]


    def generator(environ, start_response):
        # start_response called late, from inside the iteration, as PEP 3333 allows.
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"one;"
        yield b""
        yield b"two;"
        yield b"three"


    def lazy_generator(environ, start_response):
        return generator(environ, start_response)


    def write_callable(environ, start_response):
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"first;")
        return [b"second"]


    def stream_with_length(environ, start_response):
        start_response("200 OK", [("Content-Length", "10")])
        yield b"01234"
        yield b"56789"


    def exc_before(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("replaced before sending")
        except ValueError:
            start_response("503 Replaced", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"replaced"]


    def exc_after(environ, start_response):
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"partial")
        try:
            raise ValueError("exc-after-marker")
        except ValueError:
            start_response("500 Too Late", [], sys.exc_info())
        return [b"never"]


    class Closing:
        def __init__(self, marker, fail):
            self.marker = marker
            self.fail = fail

        def __iter__(self):
            if self.fail:
                raise RuntimeError("iteration failed")
            yield b"closing body"

        def close(self):
            with open(self.marker, "w") as f:
                f.write("closed")


    def closing(environ, start_response):
        start_response("200 OK", [])
        return Closing(environ["HTTP_X_MARKER"], fail=False)


    def closing_raise(environ, start_response):
        start_response("200 OK", [])
        return Closing(environ["HTTP_X_MARKER"], fail=True)


    def raises(environ, start_response):
        raise RuntimeError("boom-marker")


    def bad_header(environ, start_response):
        start_response("200 OK", [("X-Bad", "a\\r\\nInjected: yes")])
        return [b"should not be sent"]


    def bad_status(environ, start_response):
        start_response("OK", [])
        return [b"should not be sent"]


    def str_body(environ, start_response):
        start_response("200 OK", [])
        return ["text, not bytes"]


    def status(environ, start_response):
        start_response(environ["HTTP_X_STATUS"], [("X-Status", "set")])
        return iter([b"ignored body"])


    def file_wrapper(environ, start_response):
        f = open(environ["HTTP_X_FILE"], "rb")
        f.seek(int(environ.get("HTTP_X_SEEK", "0")))
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](f, 4096)


    def file_wrapper_bytesio(environ, start_response):
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"x" * 10000), 4096)


    def connection_close(environ, start_response):
        start_response("200 OK", [("Connection", "close"), ("Content-Length", "2")])
        return [b"ok"]


    def big(environ, start_response):
        start_response("200 OK", [])
        chunk = b"z" * 65536
        for _ in range(160):
            yield chunk


    def slow(environ, start_response):
        open(environ["HTTP_X_MARKER"], "w").close()
        time.sleep(0.3)
        start_response("200 OK", [])
        return [b"finished"]


    def inheritable_fds(environ, start_response):
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
        leaked = [fd for fd in fds if fd > 2 and os.path.exists(f"/proc/self/fd/{fd}")
                  and os.get_inheritable(fd)]
        start_response("200 OK", [])
        return [json.dumps(leaked).encode()]


    def prints(environ, start_response):
        print("print-marker from a request")
        start_response("200 OK", [])
        return [b""]


    MODES = {
        "echo": echo,
        "hello": hello,
        "generator": lazy_generator,
        "write": write_callable,
        "stream-length": stream_with_length,
        "exc-before": exc_before,
        "exc-after": exc_after,
        "close": closing,
        "close-raise": closing_raise,
        "raise": raises,
        "bad-header": bad_header,
        "bad-status": bad_status,
        "str-body": str_body,
        "status": status,
        "file-wrapper": file_wrapper,
        "file-wrapper-bytesio": file_wrapper_bytesio,
        "connection-close": connection_close,
        "big": big,
        "slow": slow,
        "print": prints,
        "inheritable-fds": inheritable_fds,
    }
    '''
)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Starts shims on app files written under tmp_path; stops every one of them afterwards."""
    yield from spawner(tmp_path)


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shim]:
    """One shim on the echo app, shared by the tests that only send requests."""
    root = tmp_path_factory.mktemp("echo")
    (root / "passenger_wsgi.py").write_text(ECHO_APP)
    shim = start_shim(root)
    try:
        tag, payload = shim.handshake(
            app_root=str(root), startup_file=str(root / "passenger_wsgi.py")
        )
        assert tag == "READY", payload
        yield shim
    finally:
        shim.stop()


def mode(name: str, *headers: tuple[str, str], **kwargs: Any) -> bytes:
    return http_head("/", ("X-Mode", name), *headers, **kwargs)


# The handshake


def test_ready_names_the_pid_and_concurrency(spawn: Any) -> None:
    shim, tag, payload = spawn({"passenger_wsgi.py": ECHO_APP}, "passenger_wsgi.py")
    assert tag == "READY"
    assert payload == {
        "pid": shim.process.pid,
        "concurrency": 1,
        "protocol": 1,
        "app_type": "wsgi",
    }


def test_import_error_fails_load_app_with_the_traceback(spawn: Any) -> None:
    app = "import no_such_module_for_appmanager_tests\n"
    shim, tag, payload = spawn({"passenger_wsgi.py": app}, "passenger_wsgi.py")
    assert tag == "ERROR"
    assert payload["step"] == "LOAD_APP"
    assert payload["message"] == (
        "ModuleNotFoundError: No module named 'no_such_module_for_appmanager_tests'"
    )
    assert "passenger_wsgi.py" in payload["traceback"]
    assert shim.process.wait(TIMEOUT) == 1


def test_missing_callable_names_what_was_looked_for(spawn: Any) -> None:
    app = "application = 'not callable'\n"
    shim, tag, payload = spawn({"passenger_wsgi.py": app}, "passenger_wsgi.py")
    assert tag == "ERROR"
    assert payload["step"] == "LOAD_APP"
    assert "'application' or 'app'" in payload["message"]
    assert str(shim.log_path.parent / "passenger_wsgi.py") in payload["message"]
    assert "'application' is a str" in payload["message"]
    assert shim.process.wait(TIMEOUT) == 1


def test_a_later_callable_name_is_found(spawn: Any) -> None:
    app = """
        def app(environ, start_response):
            start_response("200 OK", [])
            return [b"found app"]
    """
    shim, tag, _ = spawn({"passenger_wsgi.py": app}, "passenger_wsgi.py")
    assert tag == "READY"
    assert shim.request(http_head()).response.body == b"found app"


def test_unknown_protocol_version_fails_prepare(spawn: Any) -> None:
    shim, tag, payload = spawn({"passenger_wsgi.py": ECHO_APP}, "passenger_wsgi.py", protocol=2)
    assert tag == "ERROR"
    assert payload["step"] == "PREPARE"
    assert "protocol 2" in payload["message"]
    assert shim.process.wait(TIMEOUT) == 1


def test_package_startup_file_is_imported_by_dotted_name(spawn: Any) -> None:
    files = {
        "mysite/__init__.py": "",
        "mysite/settings.py": "GREETING = 'hello from settings'\n",
        "mysite/wsgi.py": """
            from . import settings

            def application(environ, start_response):
                start_response("200 OK", [])
                return [f"{__name__}: {settings.GREETING}".encode()]
        """,
    }
    shim, tag, payload = spawn(files, "mysite/wsgi.py", callables=["application"])
    assert tag == "READY", payload
    assert shim.request(http_head()).response.body == b"mysite.wsgi: hello from settings"


def test_startup_file_without_py_extension(spawn: Any) -> None:
    app = """
        def application(environ, start_response):
            start_response("200 OK", [])
            return [__name__.encode()]
    """
    shim, tag, payload = spawn({"app.wsgi": app}, "app.wsgi")
    assert tag == "READY", payload
    assert shim.request(http_head()).response.body == b"app"


def test_loose_startup_file_in_a_subdirectory_imports_its_neighbours(spawn: Any) -> None:
    files = {
        "config/helpers.py": "GREETING = 'from a neighbour'\n",
        "config/app.py": """
            import helpers

            def application(environ, start_response):
                start_response("200 OK", [])
                return [helpers.GREETING.encode()]
        """,
    }
    shim, tag, payload = spawn(files, "config/app.py")
    assert tag == "READY", payload
    assert shim.request(http_head()).response.body == b"from a neighbour"


def test_sys_exit_while_loading_fails_load_app(spawn: Any) -> None:
    shim, tag, payload = spawn({"passenger_wsgi.py": "raise SystemExit(3)\n"}, "passenger_wsgi.py")
    assert (tag, payload["step"], payload["message"]) == ("ERROR", "LOAD_APP", "SystemExit: 3")
    assert shim.process.wait(TIMEOUT) == 1


def test_loose_startup_file_is_a_module_named_after_it(echo: Shim) -> None:
    environ = echo.request(http_head()).response.json()
    assert environ["module"] == "passenger_wsgi"


def test_app_output_reaches_the_log(echo: Shim) -> None:
    echo.request(mode("print"))
    assert "echo app loaded" in echo.log()
    assert "print-marker from a request" in echo.log()


# Process lifetime


def test_eof_on_the_control_channel_exits_0(spawn: Any) -> None:
    shim, tag, _ = spawn({"passenger_wsgi.py": ECHO_APP}, "passenger_wsgi.py")
    assert tag == "READY"
    shim.control.close()
    assert shim.process.wait(TIMEOUT) == 0


def test_sigterm_while_idle_exits_0_promptly(spawn: Any) -> None:
    shim, tag, _ = spawn({"passenger_wsgi.py": ECHO_APP}, "passenger_wsgi.py")
    assert tag == "READY"
    started = time.monotonic()
    shim.process.send_signal(signal.SIGTERM)
    assert shim.process.wait(TIMEOUT) == 0
    assert time.monotonic() - started < 2


def test_sigterm_during_a_request_finishes_it_first(spawn: Any, tmp_path: Path) -> None:
    shim, tag, _ = spawn({"passenger_wsgi.py": ECHO_APP}, "passenger_wsgi.py")
    assert tag == "READY"
    marker = tmp_path / "slow-started"
    connection = shim.connect()
    shim.seq += 1
    head = mode("slow", ("X-Marker", str(marker)))
    line = f"Q {shim.seq} K 127.0.0.1 1 127.0.0.1 2 http {len(head)} 0\n".encode()
    socket.send_fds(shim.control, [line + head], [connection.server.fileno()])
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    shim.process.send_signal(signal.SIGTERM)
    assert shim.wait_done(connection) == f"D {shim.seq} k"
    response, _ = parse_response(connection.finish())
    assert response.body == b"finished"
    assert shim.process.wait(TIMEOUT) == 0


def test_no_descriptor_leaks_into_subprocesses_of_the_app(echo: Shim) -> None:
    # The control channel, the progress file and the client connection are all close-on-exec.
    assert echo.request(mode("inheritable-fds")).response.json() == []


def test_a_malformed_message_reports_c_and_the_process_goes_on(echo: Shim) -> None:
    connection = echo.connect()
    echo.seq += 1
    head = http_head()
    line = f"Q {echo.seq} K 127.0.0.1 1 127.0.0.1 2 http {len(head) + 5} 0\n".encode()
    socket.send_fds(echo.control, [line + head], [connection.server.fileno()])
    assert echo.wait_done(connection) == f"D {echo.seq} c"
    assert connection.finish() == b""
    assert "protocol error" in echo.log()
    assert echo.request(http_head()).response.status == 200


def test_sigint_is_ignored(spawn: Any) -> None:
    shim, tag, _ = spawn({"passenger_wsgi.py": ECHO_APP}, "passenger_wsgi.py")
    assert tag == "READY"
    shim.process.send_signal(signal.SIGINT)
    assert shim.request(http_head()).done.endswith(" k")
    assert shim.process.poll() is None


# The environ


def test_environ_has_every_pep_3333_key(echo: Shim) -> None:
    head = http_head("/some/path?a=1&b=%20", ("Content-Type", "text/plain"))
    result = echo.request(head, b"hello", scheme="https")
    env = result.response.json()
    assert result.done == f"D {echo.seq} k"
    assert env["REQUEST_METHOD"] == "GET"
    assert env["SCRIPT_NAME"] == ""
    assert env["PATH_INFO"] == "/some/path"
    assert env["QUERY_STRING"] == "a=1&b=%20"
    assert env["CONTENT_TYPE"] == "text/plain"
    assert env["CONTENT_LENGTH"] == "5"
    # From the message, not from Host: PEP 3333 lets HTTP_HOST differ.
    assert env["SERVER_NAME"] == "127.0.0.1"
    assert env["SERVER_PORT"] == "8000"
    assert env["HTTP_HOST"] == "example.test:8080"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["REMOTE_ADDR"] == "192.0.2.7"
    assert env["REMOTE_PORT"] == "54321"
    assert env["wsgi.url_scheme"] == "https"
    assert env["wsgi"] == {
        "version": [1, 0],
        "multithread": False,
        "multiprocess": True,
        "run_once": False,
        "input_terminated": True,
        "errors_is_stderr": True,
        "file_wrapper": "FileWrapper",
    }
    assert "HTTP_CONTENT_TYPE" not in env
    assert "HTTP_CONTENT_LENGTH" not in env


def test_path_info_is_percent_decoded_bytes_as_latin_1(echo: Shim) -> None:
    env = echo.request(http_head("/caf%C3%A9/a%2Fb?q=caf%C3%A9")).response.json()
    assert env["PATH_INFO"] == "/caf\u00c3\u00a9/a/b"
    assert env["QUERY_STRING"] == "q=caf%C3%A9"
    assert env["REQUEST_URI"] == "/caf%C3%A9/a%2Fb?q=caf%C3%A9"


def test_repeated_headers_are_joined(echo: Shim) -> None:
    head = http_head(
        "/",
        ("X-Multi", "a"),
        ("Cookie", "one=1"),
        ("x-multi", "b"),
        ("Cookie", "two=2"),
    )
    env = echo.request(head).response.json()
    assert env["HTTP_X_MULTI"] == "a, b"
    assert env["HTTP_COOKIE"] == "one=1; two=2"


def test_headers_with_underscores_are_dropped(echo: Shim) -> None:
    head = http_head("/", ("X-Forwarded-For", "10.0.0.1"), ("X_Forwarded_For", "6.6.6.6"))
    env = echo.request(head).response.json()
    assert env["HTTP_X_FORWARDED_FOR"] == "10.0.0.1"


def test_chunked_request_gets_content_length_and_no_transfer_encoding(echo: Shim) -> None:
    head = http_head("/", ("Transfer-Encoding", "chunked"), method="POST")
    env = echo.request(head, b"de-chunked body").response.json()
    assert env["CONTENT_LENGTH"] == "15"
    assert "HTTP_TRANSFER_ENCODING" not in env
    assert env["body"]["length"] == 15


def test_content_length_comes_from_body_len_not_the_head(echo: Shim) -> None:
    env = echo.request(http_head("/", ("Content-Length", "999"), method="POST"), b"abc")
    assert env.response.json()["CONTENT_LENGTH"] == "3"


def test_no_content_length_without_a_body(echo: Shim) -> None:
    env = echo.request(http_head()).response.json()
    assert "CONTENT_LENGTH" not in env
    assert env["body"]["length"] == 0
    post = echo.request(http_head("/", ("Content-Length", "0"), method="POST")).response.json()
    assert post["CONTENT_LENGTH"] == "0"


def test_base_uri_is_script_name_and_leaves_path_info(spawn: Any) -> None:
    shim, tag, _ = spawn({"passenger_wsgi.py": ECHO_APP}, "passenger_wsgi.py", base_uri="/sub/")
    assert tag == "READY"
    env = shim.request(http_head("/sub/page?x=1")).response.json()
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/sub", "/page")
    env = shim.request(http_head("/sub")).response.json()
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/sub", "")
    env = shim.request(http_head("/subway")).response.json()
    assert env["PATH_INFO"] == "/subway"


# wsgi.input


@pytest.mark.parametrize(
    ("how", "pieces"),
    [
        ("read", 1),
        ("read-n", 3),
        ("readline", 3),
        ("readlines", 3),
        ("iter", 3),
    ],
)
def test_inline_body(echo: Shim, how: str, pieces: int) -> None:
    body = b"first line\nsecond line\n" + b"x" * 2000
    head = http_head("/", ("X-Read", how), method="POST")
    env = echo.request(head, body).response.json()
    assert env["body"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert env["body"]["pieces"] == pieces
    assert env["body"]["after"] == 0


def test_readline_limit(echo: Shim) -> None:
    head = http_head("/", ("X-Read", "readline-limit"), method="POST")
    env = echo.request(head, b"abcdefghij\nxyz").response.json()
    assert env["body"]["first"] == ["abcd", "efgh", "ij\n", "xyz"]


def test_largest_inline_body(echo: Shim) -> None:
    body = os.urandom(256 * 1024)
    env = echo.request(http_head("/", method="POST"), body).response.json()
    assert env["body"]["sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("how", ["read", "read-n", "readline", "iter"])
def test_body_in_a_file_is_read_from_offset_0_and_never_past_body_len(
    echo: Shim, tmp_path: Path, how: str
) -> None:
    body = b"".join(b"line %07d %s\n" % (i, b"y" * 80) for i in range(55_000))
    assert len(body) > 5_000_000
    path = tmp_path / "body"
    # Bytes past body_len must never be read.
    path.write_bytes(body + b"NOT PART OF THE BODY")
    head = http_head("/", ("X-Read", how), method="POST")
    result = echo.request(head, body, body_file=path)
    env = result.response.json()
    assert result.done == f"D {echo.seq} k"
    assert env["CONTENT_LENGTH"] == str(len(body))
    assert env["body"]["length"] == len(body)
    assert env["body"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert env["body"]["after"] == 0
    if how in ("readline", "iter"):
        assert env["body"]["pieces"] == 55_000
        assert env["body"]["first"][0] == "line 0000000 " + "y" * 80 + "\n"


# Responses


def test_list_body_gets_content_length_and_keep_alive(echo: Shim) -> None:
    result = echo.request(http_head())
    response = result.response
    assert result.done == f"D {echo.seq} k"
    assert (response.status, response.reason) == (200, "OK")
    assert response.header("Content-Length") == str(len(response.body))
    assert response.header("Content-Type") == "application/json"
    assert response.header("Connection") is None
    assert response.header("Date") is not None
    assert response.header("Date").endswith(" GMT")  # type: ignore[union-attr]


def test_progress_file_holds_the_seq_of_the_last_response(echo: Shim) -> None:
    echo.request(http_head())
    assert echo.progress() == echo.seq
    echo.request(mode("generator"))
    assert echo.progress() == echo.seq


def test_generator_is_chunked_on_http_1_1(echo: Shim) -> None:
    result = echo.request(mode("generator"))
    assert result.done == f"D {echo.seq} k"
    assert result.response.chunked
    assert result.response.body == b"one;two;three"
    # An empty chunk from the app must not end the chunked body early.
    assert result.raw.endswith(b"5\r\nthree\r\n0\r\n\r\n")


def test_generator_is_close_delimited_on_http_1_0(echo: Shim) -> None:
    result = echo.request(mode("generator", version="HTTP/1.0"))
    assert result.done == f"D {echo.seq} c"
    assert not result.response.chunked
    assert result.response.header("Connection") == "close"
    assert result.response.body == b"one;two;three"


def test_http_1_0_keep_alive_with_a_known_length(echo: Shim) -> None:
    result = echo.request(http_head("/", ("Connection", "keep-alive"), version="HTTP/1.0"))
    assert result.done == f"D {echo.seq} k"
    assert result.response.header("Connection") == "keep-alive"
    assert result.response.json()["SERVER_PROTOCOL"] == "HTTP/1.0"


def test_http_1_0_without_keep_alive_closes(echo: Shim) -> None:
    result = echo.request(http_head(version="HTTP/1.0"))
    assert result.done == f"D {echo.seq} c"
    assert result.response.header("Connection") == "close"


def test_connection_close_from_the_client(echo: Shim) -> None:
    result = echo.request(http_head("/", ("Connection", "close")))
    assert result.done == f"D {echo.seq} c"
    assert result.response.header("Connection") == "close"


def test_no_k_flag_closes(echo: Shim) -> None:
    result = echo.request(http_head(), flags="-")
    assert result.done == f"D {echo.seq} c"
    assert result.response.header("Connection") == "close"


def test_connection_close_from_the_app(echo: Shim) -> None:
    result = echo.request(mode("connection-close"))
    assert result.done == f"D {echo.seq} c"
    assert result.response.header("Connection") == "close"
    assert result.response.body == b"ok"


def test_write_callable(echo: Shim) -> None:
    result = echo.request(mode("write"))
    assert result.done == f"D {echo.seq} k"
    assert result.response.chunked
    assert result.response.body == b"first;second"


def test_streamed_body_with_the_apps_content_length_is_not_chunked(echo: Shim) -> None:
    result = echo.request(mode("stream-length"))
    assert result.done == f"D {echo.seq} k"
    assert not result.response.chunked
    assert result.response.header("Content-Length") == "10"
    assert result.response.body == b"0123456789"


def test_head_sends_the_headers_only(echo: Shim) -> None:
    result = echo.request(mode("hello", method="HEAD"))
    assert result.done == f"D {echo.seq} k"
    assert result.raw.endswith(b"\r\n\r\n")
    assert result.response.header("Content-Length") == str(len(b"hello world"))
    streamed = echo.request(mode("generator", method="HEAD"))
    assert streamed.done == f"D {echo.seq} k"
    assert streamed.raw.endswith(b"\r\n\r\n")
    assert streamed.response.header("Transfer-Encoding") is None


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
def test_bodiless_statuses(echo: Shim, status: str) -> None:
    result = echo.request(mode("status", ("X-Status", status)))
    assert result.done == f"D {echo.seq} k"
    assert result.raw.endswith(b"\r\n\r\n")
    assert result.response.header("X-Status") == "set"
    assert result.response.header("Transfer-Encoding") is None
    assert result.response.header("Content-Length") is None


def test_keep_alive_connection_serves_two_requests(echo: Shim) -> None:
    connection = echo.connect()
    assert echo.send(connection, mode("generator")) == f"D {echo.seq} k"
    # The shim closed its copy; the connection lives on in the core's.
    assert echo.send(connection, http_head()) == f"D {echo.seq} k"
    first, rest = parse_response(connection.finish())
    second, rest = parse_response(rest)
    assert first.body == b"one;two;three"
    assert second.json()["PATH_INFO"] == "/"
    assert rest == b""


def test_file_wrapper_sends_a_regular_file(echo: Shim, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "download.bin"
    path.write_bytes(data)
    result = echo.request(mode("file-wrapper", ("X-File", str(path)), ("X-Seek", "17")))
    assert result.done == f"D {echo.seq} k"
    assert result.response.header("Content-Length") == str(len(data) - 17)
    assert result.response.body == data[17:]


def test_file_wrapper_over_a_non_file_iterates(echo: Shim) -> None:
    result = echo.request(mode("file-wrapper-bytesio"))
    assert result.done == f"D {echo.seq} k"
    assert result.response.body == b"x" * 10000


def test_close_is_called(echo: Shim, tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    result = echo.request(mode("close", ("X-Marker", str(marker))))
    assert result.response.body == b"closing body"
    assert marker.read_text() == "closed"


def test_close_is_called_when_iteration_raises(echo: Shim, tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    result = echo.request(mode("close-raise", ("X-Marker", str(marker))))
    assert result.response.status == 500
    assert marker.read_text() == "closed"


def test_client_gone_reports_c(echo: Shim) -> None:
    logged_before = len(echo.log())
    connection = echo.connect()
    connection.reset_by_client()
    assert echo.send(connection, mode("big")) == f"D {echo.seq} c"
    # A client going away is routine, not an error worth a traceback.
    assert echo.log()[logged_before:] == ""


# Errors


def test_app_exception_is_a_500_without_traceback_in_production(echo: Shim) -> None:
    result = echo.request(mode("raise"))
    assert result.done == f"D {echo.seq} k"
    assert result.response.status == 500
    assert result.response.header("Content-Type") == "text/html; charset=utf-8"
    assert b"Internal Server Error" in result.response.body
    assert b"boom-marker" not in result.response.body
    assert "RuntimeError: boom-marker" in echo.log()


def test_app_exception_shows_the_traceback_in_development(spawn: Any) -> None:
    shim, tag, _ = spawn(
        {"passenger_wsgi.py": ECHO_APP}, "passenger_wsgi.py", environment="development"
    )
    assert tag == "READY"
    result = shim.request(mode("raise"))
    assert result.response.status == 500
    assert b"RuntimeError: boom-marker" in result.response.body


def test_500_on_a_connection_that_may_not_stay_open(echo: Shim) -> None:
    result = echo.request(mode("raise"), flags="-")
    assert result.done == f"D {echo.seq} c"
    assert result.response.status == 500


@pytest.mark.parametrize("name", ["bad-header", "bad-status", "str-body"])
def test_invalid_responses_are_500(echo: Shim, name: str) -> None:
    result = echo.request(mode(name))
    assert result.response.status == 500
    assert b"should not be sent" not in result.raw
    assert b"Injected" not in result.raw


def test_exc_info_before_the_headers_replaces_them(echo: Shim) -> None:
    result = echo.request(mode("exc-before"))
    assert result.done == f"D {echo.seq} k"
    assert (result.response.status, result.response.reason) == (503, "Replaced")
    assert result.response.body == b"replaced"


def test_exc_info_after_the_headers_reraises_and_closes(echo: Shim) -> None:
    connection = echo.connect()
    assert echo.send(connection, mode("exc-after")) == f"D {echo.seq} c"
    raw = connection.finish()
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert raw.endswith(b"7\r\npartial\r\n")  # no last chunk: the client sees a cut response
    assert "ValueError: exc-after-marker" in echo.log()


# The access log's fields in D


def test_d_reports_status_and_body_bytes_of_a_whole_response(echo: Shim) -> None:
    result = echo.request(mode("hello"))
    assert echo.replies[-1] == f"D {echo.seq} k 200 11"
    assert (result.status, result.size) == (200, len(b"hello world"))


def test_d_reports_body_bytes_of_a_chunked_response_without_the_framing(echo: Shim) -> None:
    result = echo.request(mode("generator"))
    assert result.response.chunked
    assert echo.replies[-1] == f"D {echo.seq} k 200 {len(b'one;two;three')}"
    write = echo.request(mode("write"))
    assert (write.status, write.size) == (200, len(b"first;second"))


def test_d_reports_no_body_bytes_for_head(echo: Shim) -> None:
    echo.request(mode("hello", method="HEAD"))
    assert echo.replies[-1] == f"D {echo.seq} k 200 0"
    echo.request(mode("generator", method="HEAD"))
    assert echo.replies[-1] == f"D {echo.seq} k 200 0"


def test_d_reports_the_500_page_the_shim_sent(echo: Shim) -> None:
    result = echo.request(mode("raise"))
    assert echo.replies[-1] == f"D {echo.seq} k 500 {len(result.response.body)}"
    assert result.size and result.size > 0


def test_d_reports_the_status_the_app_replaced_and_what_a_file_sent(
    echo: Shim, tmp_path: Path
) -> None:
    replaced = echo.request(mode("exc-before"))
    assert (replaced.status, replaced.size) == (503, len(b"replaced"))
    nothing = echo.request(mode("status", ("X-Status", "204 No Content")))
    assert (nothing.status, nothing.size) == (204, 0)
    path = tmp_path / "download.bin"
    path.write_bytes(os.urandom(100_000))
    sent = echo.request(mode("file-wrapper", ("X-File", str(path)), ("X-Seek", "10")))
    assert (sent.status, sent.size) == (200, 99_990)


def test_d_reports_what_was_sent_before_an_error_after_the_response_began(echo: Shim) -> None:
    connection = echo.connect()
    echo.send(connection, mode("exc-after"))
    assert echo.replies[-1] == f"D {echo.seq} c 200 {len(b'partial')}"
    connection.finish()


def test_d_has_no_access_log_fields_when_the_response_never_began(echo: Shim) -> None:
    connection = echo.connect()
    connection.reset_by_client()
    echo.send(connection, mode("big"))
    assert echo.replies[-1] == f"D {echo.seq} c"


def test_the_process_keeps_serving_after_errors(echo: Shim) -> None:
    echo.request(mode("raise"))
    assert echo.request(http_head()).response.status == 200
