"""mod_appmanager in a real Apache: building it, its directives, and serving real apps through the
core it starts (docs/protocol/connector.md)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from apache import (
    ApacheFactory,
    ApacheServer,
    error_line,
    json_of,
    missing,
    vhost,
    worker_user,
)
from conftest import free_port
from webserver import app_source, public_dir
from webserver import copy_app as copy_app_dir

from appmanager import detect

ROOT = Path(__file__).resolve().parents[3]
DEF_PATH = ROOT / "integrations" / "appmanager_directives.def"

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))


@pytest.fixture
def apache() -> Iterator[ApacheFactory]:
    """Start Apaches with mod_appmanager; all are stopped (with their cores) after the test."""
    factory = ApacheFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def site() -> Iterator[tuple[ApacheServer, dict[str, Path]]]:
    """One Apache for the read-only tests: a Passenger-style virtual host (no AppManager
    directive at all) and one virtual host per framework."""
    factory = ApacheFactory()
    base = factory.site()
    apps = {
        "echo": copy_app("wsgi_echo", base, {"hello.txt": "static hello\n", "dir/index.html": "i"}),
        "flask": copy_app("flask_app", base),
        "django": copy_app("django_project", base),
        "sinatra": copy_app("sinatra_app", base),
        "rails": copy_app("rails_app", base),
        "express": copy_app("express_app", base),
    }
    passenger = vhost(
        "passenger.test",
        apps["echo"] / "public",
        "    PassengerRoot /usr/lib/ruby/vendor_ruby/phusion_passenger/locations.ini\n"
        "    PassengerDefaultRuby /usr/bin/ruby\n"
        "    PassengerAppEnv staging\n"
        "    PassengerMinInstances 1\n"
        '    SetEnv GREETING "hello from SetEnv"\n'
        "    <Location /apache-only>\n        PassengerEnabled off\n    </Location>\n"
        "    RewriteEngine on\n    RewriteRule ^/old/(.*)$ /new/$1?from=old [PT,QSA]\n",
    )
    frameworks = "".join(
        vhost(
            f"{name}.test",
            base / "nowhere",
            f'    AppManagerEnabled on\n    AppManagerAppRoot "{apps[name]}"\n{extra}',
        )
        for name, extra in (
            ("flask", "    AppManagerStartupFile app.py\n"),
            ("django", ""),
            ("sinatra", ""),
            ("express", "    AppManagerEnvironment staging\n"),
        )
    )
    # Rails under a base URI of another virtual host, as Passenger configures a sub-URI app.
    frameworks += vhost(
        "rails.test",
        base / "nowhere",
        f'    Alias /shop "{apps["rails"]}/public"\n'
        "    <Location /shop>\n        AppManagerEnabled on\n"
        f'        AppManagerAppRoot "{apps["rails"]}"\n'
        "        AppManagerBaseURI /shop\n    </Location>\n",
    )
    server = factory.start(passenger + frameworks)
    try:
        yield server, apps
    finally:
        factory.close()


def copy_app(name: str, parent: Path, static: dict[str, str] | None = None) -> Path:
    """A world-readable copy of tests/apps/NAME with ``static`` files in its public/."""
    return copy_app_dir(app_source(name), parent, static)


def directive_rows() -> list[tuple[str, str, str, str, str]]:
    """(apache name, setting, kind, role, check) for every directive of the generated table."""
    text = DEF_PATH.read_text()
    settings = {
        m[0]: (m[1], m[2], m[3], m[4])
        for m in re.findall(
            r'AM_SETTING\((\w+), "(\w+)", (\w+), (\w+), (\w+), [\d.]+, (?:NULL|"[^"]*")\)', text
        )
    }
    return [
        (apache_name, *settings[setting_id])
        for setting_id, apache_name in re.findall(r'AM_DIRECTIVE\((\w+), "\w+", "(\w+)"\)', text)
    ]


def sample(setting: str, kind: str, check: str) -> str:
    """A valid value for a directive."""
    if kind == "AM_BOOL":
        return "On"
    if kind == "AM_ENV":
        return 'SAMPLE_VAR "a value"'
    if check == "AM_CHECK_USER":
        return "nobody"
    if check == "AM_CHECK_GROUP":
        return "nogroup"
    if check == "AM_CHECK_READABLE_FILE":
        return "/etc/hostname"
    if check == "AM_CHECK_HOST_PORT":
        return "127.0.0.1:9"
    if check == "AM_CHECK_URL":
        return "http://127.0.0.1/"
    if check == "AM_CHECK_URI_PATH":
        return "/sub"
    if kind in ("AM_INT", "AM_FLOAT"):
        return "2"
    return {
        "app_type": "wsgi",
        "spawn_method": "direct",
        "log_level": "info",
    }.get(setting, "/tmp/sample")


def test_module_build_prints_its_path_last(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "appmanager", "apache-module", "build", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path == tmp_path / "mod_appmanager.so" and path.is_file()
    assert path.read_bytes()[:4] == b"\x7fELF"


def test_module_build_without_apxs_names_the_package(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "appmanager", "apache-module", "build"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": str(tmp_path)},
        timeout=60,
    )
    assert out.returncode == 1
    assert "apxs" in out.stderr and "apache2-dev" in out.stderr


def test_every_directive_and_passenger_alias_is_accepted(apache: ApacheFactory) -> None:
    rows = directive_rows()
    names = {row[0] for row in rows}
    assert {"AppManagerMinInstances", "PassengerMinInstances", "PassengerBaseURI"} <= names
    top, inner = [], []
    for name, setting, kind, role, check in rows:
        line = f"{name} {sample(setting, kind, check)}"
        if role == "AM_ROLE_CORE" or setting in ("core_socket", "core_command"):
            top.append(line)
        else:
            inner.append("        " + line)
    body = "<Location /app>\n" + "\n".join(inner) + "\n</Location>\n"
    # Passenger's installation directives are accepted too, and do nothing.
    top += ["PassengerRoot /usr/lib/ruby/vendor_ruby/phusion_passenger/locations.ini"]
    top += ["PassengerDefaultRuby /usr/bin/ruby", "PassengerInstanceRegistryDir /tmp"]
    # Passenger's numeric log levels are mapped.
    top += ["PassengerLogLevel 3"]
    result = apache.config_test(body, top="\n".join(top))
    assert result.returncode == 0, result.stderr
    assert "Syntax OK" in result.stderr


@pytest.mark.parametrize(
    ("where", "line", "reason"),
    [
        ("dir", "AppManagerMinInstances -1", "must be at least 0, got -1"),
        ("dir", "PassengerMaxRequests many", "must be an integer, got 'many'"),
        ("dir", "PassengerAppType php", "must be one of wsgi, asgi, rack, node, generic"),
        ("dir", "AppManagerBaseURI shop", "must be a path starting with /"),
        ("dir", "AppManagerUser root", "apps never run as root"),
        ("dir", "PassengerUser no-such-user-here", "user 'no-such-user-here' does not exist"),
        ("dir", "AppManagerGroup no-such-group-here", "group 'no-such-group-here' does not"),
        ("dir", "AppManagerCustomErrorPage /no/such/page.html", "does not exist"),
        ("dir", 'AppManagerEnvironment ""', "must not be empty"),
        ("dir", "AppManagerEnabled maybe", "must be On or Off"),
        ("dir", "AppManagerEnvVar ONLY_A_NAME", "takes two arguments"),
        ("top", "AppManagerMaxPoolSize 0", "must be at least 1, got 0"),
        ("top", "PassengerMetricsAddress nohost", "must be HOST:PORT"),
        ("top", "AppManagerPreStart ftp://example.com/", "must be an http:// or https:// URL"),
        ("vhost", "AppManagerMaxPoolSize 4", "cannot occur within <VirtualHost>"),
        ("dir", "AppManagerCoreSocket /tmp/x.sock", "not allowed in <Location> context"),
    ],
)
def test_config_test_fails_naming_the_directive(
    apache: ApacheFactory, where: str, line: str, reason: str
) -> None:
    body, top = "", ""
    if where == "top":
        top = line
    elif where == "vhost":
        body = f"<VirtualHost *>\n{line}\n</VirtualHost>\n"
    else:
        body = f"<Location /app>\n{line}\n</Location>\n"
    result = apache.config_test(body, top=top)
    assert result.returncode != 0
    message = error_line(result.stderr)
    assert line.split()[0] in message and reason in message, result.stderr


def test_config_test_checks_the_module_can_start(apache: ApacheFactory) -> None:
    result = apache.config_test("", without=("mod_proxy_http.so",))
    assert result.returncode != 0
    assert "mod_appmanager needs mod_proxy and mod_proxy_http" in result.stderr
    result = apache.config_test("", top="AppManagerCoreCommand /no/such/appmanager")
    assert result.returncode != 0
    assert "AppManagerCoreCommand: /no/such/appmanager is not an executable" in result.stderr


def test_passenger_vhost_serves_app_and_static_files(site: tuple[ApacheServer, dict]) -> None:
    server, apps = site
    static = server.get("/hello.txt", host="passenger.test")
    assert static.status == 200 and static.body == b"static hello\n"
    assert server.get("/dir/", host="passenger.test").body == b"i"
    # A <Location> with PassengerEnabled off is Apache's alone.
    assert server.get("/apache-only/x", host="passenger.test").status == 404
    env = json_of(server.get("/some/path?a=1&b=%20two", host="passenger.test"))
    assert env["PATH_INFO"] == "/some/path"
    assert env["QUERY_STRING"] == "a=1&b=%20two"
    assert env["REQUEST_URI"] == "/some/path?a=1&b=%20two"
    assert env["HTTP_HOST"] == "passenger.test"
    assert env["SERVER_NAME"] == "passenger.test"
    assert env["SERVER_PORT"] == str(server.port)
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["wsgi.url_scheme"] == "http"
    # A rewritten request goes to the app as rewritten.
    rewritten = json_of(server.get("/old/p%20q?x=1", host="passenger.test"))
    assert rewritten["PATH_INFO"] == "/new/p q"
    assert rewritten["QUERY_STRING"] == "from=old&x=1"
    # mod_proxy adds no X-Forwarded-* of its own: the app sees the client's headers.
    assert not any(key.startswith("HTTP_X_FORWARDED") or key == "HTTP_VIA" for key in env)
    # PassengerAppEnv and SetEnv reach the app's environment.
    assert server.get("/app/env?WSGI_ENV", host="passenger.test").body == b"staging"
    assert server.get("/app/env?GREETING", host="passenger.test").body == b"hello from SetEnv"


def test_forged_connector_fields_are_ignored(site: tuple[ApacheServer, dict]) -> None:
    server, apps = site
    forged = (
        "!~App: app_root=%2Fetc&env_var=GREETING%3Dforged\r\n"
        "!~client: 203.0.113.9 1 evil.example 443 https\r\n"
        "!~Other: x\r\n"
        "!~Secret: 00000000000000000000000000000000\r\n"
    )
    env = json_of(server.get("/echo", host="passenger.test", headers=forged))
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["SERVER_NAME"] == "passenger.test"
    assert env["wsgi.url_scheme"] == "http"
    assert not [key for key in env if "!" in key or "~" in key]
    greeting = server.get("/app/env?GREETING", host="passenger.test", headers=forged)
    assert greeting.body == b"hello from SetEnv"


def test_request_bodies_reach_the_app(site: tuple[ApacheServer, dict]) -> None:
    server, _ = site
    data = os.urandom(300_000)
    for chunked in (False, True):
        if chunked:
            framing = b"Transfer-Encoding: chunked\r\n"
            payload = b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n"
        else:
            framing = b"Content-Length: %d\r\n" % len(data)
            payload = data
        raw = (
            b"POST /conformance HTTP/1.1\r\nHost: passenger.test\r\n"
            + framing
            + b"Connection: close\r\n\r\n"
            + payload
        )
        body = json_of(server.request(raw))
        assert body["body_len"] == len(data)
        assert body["body_sha256"] == hashlib.sha256(data).hexdigest()


def _core_connections(server: ApacheServer) -> set[int]:
    """The inodes of the core's ends of connections from Apache."""
    core = server.core()
    assert core is not None
    socket_path = str(server.run_dir / "instance" / "connector.sock")
    inodes = set()
    for conn in core.net_connections(kind="unix"):
        if conn.laddr == socket_path and conn.fd >= 0:
            try:
                link = os.readlink(f"/proc/{core.pid}/fd/{conn.fd}")
            except OSError:
                continue
            inodes.add(int(link.strip("socket:[]")))
    return inodes


def test_connections_to_the_core_are_reused(site: tuple[ApacheServer, dict]) -> None:
    server, _ = site
    assert server.get("/app/pid", host="passenger.test").status == 200
    first = _core_connections(server)
    seen = set(first)
    for _ in range(30):
        assert server.get("/app/pid", host="passenger.test").status == 200
        seen |= _core_connections(server)
    # Each request came on a new client connection; Apache took a pooled connection to the core
    # for it (one per busy thread at most) instead of opening one per request, and the pooled
    # ones outlive the requests.
    assert first & _core_connections(server), (first, seen)
    assert len(seen) <= 8, seen


def test_flask(site: tuple[ApacheServer, dict]) -> None:
    server, _ = site
    assert server.get("/", host="flask.test").body == b"Hello from Flask\n"
    stream = server.get("/stream", host="flask.test")
    assert stream.body == b"".join(f"part {i}\n".encode() for i in range(5))
    cookie = json.loads(server.get("/cookie", host="flask.test", headers="Cookie: n=5\r\n").body)
    assert cookie == {"seen": "5"}
    assert server.get("/nope", host="flask.test").status == 404


def test_django(site: tuple[ApacheServer, dict]) -> None:
    server, _ = site
    assert server.get("/", host="django.test").body == b"Hello from Django\n"
    info = json.loads(server.get("/info/?q=search&x=1", host="django.test").body)
    assert info["path"] == "/info/" and info["query"] == {"q": "search", "x": "1"}
    assert info["host"] == "django.test" and info["remote_addr"] == "127.0.0.1"


def test_sinatra(site: tuple[ApacheServer, dict]) -> None:
    server, _ = site
    assert server.get("/", host="sinatra.test").body == b"Hello from Sinatra"
    data = json.loads(server.get("/search?q=rack&page=3", host="sinatra.test").body)
    assert data == {"q": "rack", "page": 3, "script_name": ""}


def test_rails_under_a_base_uri(site: tuple[ApacheServer, dict]) -> None:
    server, _ = site
    show = json.loads(server.get("/shop/items/7?q=find", host="rails.test").body)
    assert show == {"id": "7", "q": "find", "path": "/shop/items/7", "script_name": "/shop"}
    assert server.get("/elsewhere", host="rails.test").status == 404


def test_express(site: tuple[ApacheServer, dict]) -> None:
    server, _ = site
    root = json.loads(server.get("/", host="express.test").body)
    assert root["hello"] == "express" and root["env"] == "staging"
    info = json.loads(server.get("/info", host="express.test").body)
    assert info["path"] == "/info" and info["hostname"] == "express.test"


def test_graceful_restart_keeps_the_core_and_applies_new_settings(apache: ApacheFactory) -> None:
    app = copy_app("wsgi_echo", apache.site())
    inner = f'    AppManagerAppRoot "{app}"\n    AppManagerEnvVar COLOR red\n'
    server = apache.start(vhost("echo.test", app / "public", inner))
    assert server.get("/app/env?COLOR", host="echo.test").body == b"red"
    core = server.core()
    assert core is not None
    old_app_pid = int(server.get("/app/pid", host="echo.test").body)
    conf = server.conf_path.read_text().replace("COLOR red", "COLOR blue")
    server.reconfigure(conf)
    assert server.get("/app/env?COLOR", host="echo.test").body == b"blue"
    assert server.core() == core and core.is_running()
    assert int(server.get("/app/pid", host="echo.test").body) != old_app_pid
    # SIGUSR1 is what `apache2 -k graceful` sends, SIGHUP `apache2 -k restart` (which stops
    # the children at once): the core serves on through both.
    assert server.proc is not None
    for sig in (signal.SIGUSR1, signal.SIGHUP):
        before = server.error_log().count("resuming normal operations")
        os.kill(server.proc.pid, sig)
        deadline = time.monotonic() + 20
        while server.error_log().count("resuming normal operations") == before:
            assert time.monotonic() < deadline, server.logs()
            time.sleep(0.05)
        assert server.get("/app/env?COLOR", host="echo.test").body == b"blue"
        assert server.core() == core


def test_stop_stops_the_core_and_its_apps(apache: ApacheFactory) -> None:
    app = copy_app("wsgi_echo", apache.site())
    # No AppManagerInstanceDir: the core's goes under the temporary directory, named for Apache.
    server = apache.start(vhost("echo.test", app / "public"), instance_dir=False)
    assert server.get("/app/pid", host="echo.test").status == 200
    core = server.core()
    assert core is not None and server.proc is not None
    cmdline = core.cmdline()
    instance = Path(cmdline[cmdline.index("--instance-dir") + 1])
    assert re.fullmatch(r"/tmp/appmanager-apache\.\w{6}", str(instance)), instance
    secret = instance / "connector.sock.secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    user = worker_user()
    if user is not None:
        assert cmdline[cmdline.index("--connector-user") + 1] == user[0]
    apps = core.children(recursive=True)
    assert apps
    try:
        server.stop()
        for proc in [core, *apps]:
            assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
        assert not instance.exists()
    finally:
        shutil.rmtree(instance, ignore_errors=True)


def test_a_core_that_dies_is_replaced(apache: ApacheFactory) -> None:
    app = copy_app("wsgi_echo", apache.site())
    server = apache.start(vhost("echo.test", app / "public"))
    assert server.get("/app/pid", host="echo.test").status == 200
    core = server.core()
    assert core is not None
    # A core that dies within 5 s of starting is not replaced (it would die again).
    time.sleep(max(0.0, core.create_time() + 5.2 - time.time()))
    before = server.error_log().count("resuming normal operations")
    core.kill()
    deadline = time.monotonic() + 30
    # The new core has a new secret: Apache restarts gracefully to give it to its children.
    while server.error_log().count("resuming normal operations") == before:
        assert time.monotonic() < deadline, server.logs()
        time.sleep(0.05)
    assert "exited with signal 9; starting a new one" in server.error_log()
    new_core = server.core()
    assert new_core is not None and new_core.pid != core.pid
    assert server.get("/app/pid", host="echo.test").status == 200


def test_core_that_cannot_start_fails_apache_start(apache: ApacheFactory) -> None:
    app = copy_app("wsgi_echo", apache.site())
    server = apache.make(vhost("echo.test", app / "public"), top="AppManagerCoreCommand /bin/false")
    with pytest.raises(AssertionError, match="exited with exit status 1 before listening"):
        server.start()
    assert server.proc is not None and server.proc.wait(10) != 0


def test_separately_started_core(apache: ApacheFactory) -> None:
    app = copy_app("wsgi_echo", apache.site())
    sock_dir = public_dir("core")
    socket_path = sock_dir / "core.sock"
    cmd = [sys.executable, "-m", "appmanager", "core", "--socket", str(socket_path)]
    cmd += ["--instance-dir", str(sock_dir / "instance")]
    user = worker_user()
    if user is not None:
        cmd += ["--connector-user", user[0], "--user-switching", "off"]
    core = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        assert core.stdout is not None
        for line in core.stdout:
            if line.startswith("Serving"):
                break
        else:
            raise AssertionError(f"core did not start: {core.wait()}")
        server = apache.start(
            vhost("echo.test", app / "public"), top=f'AppManagerCoreSocket "{socket_path}"'
        )
        assert server.core() is None
        env = json_of(server.get("/x", host="echo.test"))
        assert env["SERVER_NAME"] == "echo.test"
        server.stop()
        # Not Apache's core: it serves on after Apache has gone.
        assert core.poll() is None
    finally:
        core.terminate()
        assert core.wait(30) == 0
        assert core.stdout is not None
        core.stdout.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_apache_config_output_runs(apache: ApacheFactory, tmp_path: Path) -> None:
    base = apache.site()
    echo = copy_app("wsgi_echo", base, {"hello.txt": "static\n"})
    sinatra = copy_app("sinatra_app", base)
    flask = copy_app("flask_app", base)
    shutil.rmtree(flask / "public")  # an app without static files
    toml = base / "appmanager.toml"
    toml.write_text(
        "max_pool_size = 4\n"
        f'[[app]]\nroot = "{echo}"\nenv_var = {{ COLOR = "green" }}\n'
        f'[[app]]\nroot = "{sinatra}"\nbase_uri = "/sub"\n'
        f'[[app]]\nroot = "{flask}"\nserver_names = ["flask.test", "www.flask.test"]\n'
        'startup_file = "app.py"\n'
    )
    run_dir = apache.new_dir("apache")
    port = free_port()
    args = ["--config", str(toml), "--port", str(port), "--run-dir", str(run_dir)]
    args += ["--instance-dir", str(run_dir / "core")]
    if os.geteuid() == 0:
        args += ["--user-switching", "off"]
    out = subprocess.run(
        [sys.executable, "-m", "appmanager", "apache-config", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "AppManagerMaxPoolSize" in out.stdout and "ServerAlias www.flask.test" in out.stdout
    assert out.stdout.count("AppManagerInstanceDir") == 1
    conf = run_dir / "httpd.conf"
    conf.write_text(out.stdout)
    server = ApacheServer(run_dir, conf, port)
    apache.servers.append(server)
    server.start()
    assert server.get("/hello.txt").body == b"static\n"
    assert server.get("/app/env?COLOR").body == b"green"
    data = json.loads(server.get("/sub/search?q=x").body)
    assert data["script_name"] == "/sub"
    assert server.get("/", host="www.flask.test").body == b"Hello from Flask\n"
    core = server.core()
    assert core is not None and "--max-pool-size" in core.cmdline()


def test_startup_files_match_detect_py() -> None:
    source = (ROOT / "integrations" / "apache" / "am_settings.c").read_text()
    block = source.split("am_startup_files[] = {", 1)[1].split("};", 1)[0]
    assert re.findall(r'"([^"]+)"', block) == [name for name, _, _ in detect.CANDIDATES]
