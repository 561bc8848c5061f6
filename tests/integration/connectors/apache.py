"""A real Apache with mod_appmanager, for the connector tests.

Each server is self-contained: its own ServerRoot, pid file, error log and locks in a fresh
directory, Apache's modules loaded from /usr/lib/apache2/modules, a free port on loopback, run in
the foreground (``apache2 -DFOREGROUND -f CONF``). As root, Apache's children run as www-data
(or nobody), so the directories they read (run directory, document roots) are world-traversable
temporary directories rather than pytest's private ones. Stopping a server waits until the core
it started, and the core's apps, have exited.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from conftest import Response, free_port, request
from webserver import public_dir

if TYPE_CHECKING:
    from webserver import Mount

MODULES_DIR = Path("/usr/lib/apache2/modules")
BASE_MODULES = (
    ("mpm_event_module", "mod_mpm_event.so"),
    ("authz_core_module", "mod_authz_core.so"),
    ("mime_module", "mod_mime.so"),
    ("dir_module", "mod_dir.so"),
    ("alias_module", "mod_alias.so"),
    ("env_module", "mod_env.so"),
    ("proxy_module", "mod_proxy.so"),
    ("proxy_http_module", "mod_proxy_http.so"),
    ("rewrite_module", "mod_rewrite.so"),
)
READY = "resuming normal operations"


def missing() -> str | None:
    """Why Apache tests cannot run here, or None."""
    if shutil.which("apache2") is None:
        return "apache2 is not installed"
    if shutil.which("apxs") is None:
        return "apxs is not installed (apache2-dev)"
    return None


@functools.cache
def module_path() -> Path:
    """mod_appmanager.so, built once per test session (and cached across sessions)."""
    from appmanager.apache import build_module

    return build_module()


def worker_user() -> tuple[str, str] | None:
    """The user and group Apache's children run as when the tests run as root."""
    if os.geteuid() != 0:
        return None
    for user in ("www-data", "nobody"):
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            continue
        return user, grp.getgrgid(entry.pw_gid).gr_name
    raise AssertionError("neither www-data nor nobody exists")


@dataclass
class ApacheServer:
    """One Apache under test, and the core its module started (none with a core socket)."""

    run_dir: Path
    conf_path: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    core_pids: set[int] = field(default_factory=set)

    @property
    def error_log_path(self) -> Path:
        return self.run_dir / "error.log"

    def error_log(self) -> str:
        try:
            return self.error_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def get(self, path: str = "/", host: str = "localhost", headers: str = "") -> Response:
        raw = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n"
        return request(self.port, raw.encode(), timeout=60)

    def request(self, raw: bytes) -> Response:
        return request(self.port, raw, timeout=60)

    def core(self) -> psutil.Process | None:
        """The core started by this Apache's module."""
        if self.proc is None:
            return None
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return None
        for child in children:
            try:
                cmdline = child.cmdline()
            except psutil.Error:
                continue
            if "core" in cmdline and "--lifeline-fd" in cmdline:
                return child
        return None

    def start(self, timeout: float = 60.0) -> None:
        with open(self.run_dir / "stderr.log", "wb") as stderr:
            self.proc = subprocess.Popen(
                ["apache2", "-DFOREGROUND", "-f", str(self.conf_path)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        self._wait_ready(1, timeout)
        core = self.core()
        if core is not None:
            self.core_pids.add(core.pid)

    def _wait_ready(self, times: int, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error_log().count(READY) >= times:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"Apache did not start:\n{self.logs()}")

    def logs(self) -> str:
        stderr = self.run_dir / "stderr.log"
        text = stderr.read_text(errors="replace") if stderr.exists() else ""
        return f"--- error log ---\n{self.error_log()[-6000:]}\n--- stderr ---\n{text[-2000:]}"

    def graceful(self, conf: str | None = None, timeout: float = 30.0) -> None:
        """Reload with ``conf`` (apache2 -k graceful); returns when the new configuration runs."""
        if conf is not None:
            self.conf_path.write_text(conf)
        before = self.error_log().count(READY)
        result = subprocess.run(
            ["apache2", "-k", "graceful", "-f", str(self.conf_path)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        self._wait_ready(before + 1, timeout)
        core = self.core()
        if core is not None:
            self.core_pids.add(core.pid)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop Apache, then wait until its core and the core's apps have exited."""
        if self.proc is None:
            return
        core = self.core()
        watched: list[psutil.Process] = []
        if core is not None:
            self.core_pids.add(core.pid)
            watched = [core, *_descendants(core)]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"Apache did not stop:\n{self.logs()}") from None
        _, alive = psutil.wait_procs(watched, timeout=timeout)
        alive = [p for p in alive if _running(p)]
        if alive:
            for p in alive:
                p.kill()
            raise AssertionError(f"left running after Apache stopped: {alive}\n{self.logs()}")
        for pid in self.core_pids:
            _reap(pid)


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _reap(pid: int) -> None:
    """A core outlives Apache by a moment and is then re-parented to the test runner (a
    subreaper): collect its exit status."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


class ApacheFactory:
    """Writes configurations and starts Apaches; everything is stopped and removed at close."""

    def __init__(self) -> None:
        self.servers: list[ApacheServer] = []
        self.dirs: list[Path] = []

    def site(self) -> Path:
        """A world-readable directory for apps and document roots; removed at close."""
        path = public_dir("site")
        self.dirs.append(path)
        return path

    def config(
        self, body: str, *, run_dir: Path, port: int, top: str = "", instance_dir: bool = True
    ) -> str:
        """A whole Apache configuration: the self-contained base, ``top`` (server-level
        directives), then ``body`` (virtual hosts)."""
        user = worker_user()
        lines = [
            f'ServerRoot "{run_dir}"',
            f'PidFile "{run_dir}/httpd.pid"',
            f'DefaultRuntimeDir "{run_dir}"',
            f'Mutex "file:{run_dir}" default',
            f'ErrorLog "{run_dir}/error.log"',
            "LogLevel warn appmanager:info mpm_event:notice",
            f"Listen 127.0.0.1:{port}",
            "ServerName localhost",
            "StartServers 1",
            "ServerLimit 2",
            "ThreadsPerChild 8",
            "MaxRequestWorkers 16",
            "MinSpareThreads 1",
            "MaxSpareThreads 16",
            "GracefulShutdownTimeout 10",
        ]
        if user is not None:
            lines += [f"User {user[0]}", f"Group {user[1]}"]
        lines += [f'LoadModule {name} "{MODULES_DIR / so}"' for name, so in BASE_MODULES]
        lines += [
            f'LoadModule appmanager_module "{module_path()}"',
            "TypesConfig /etc/mime.types",
        ]
        if instance_dir:
            lines.append(f'AppManagerInstanceDir "{run_dir}/instance"')
        if os.geteuid() == 0:
            # Apps run as the core's user (root): see tests/conftest.py.
            lines.append("AppManagerUserSwitching off")
        return "\n".join(lines) + "\n" + top + "\n" + body + "\n"

    def make(self, body: str, *, top: str = "", instance_dir: bool = True) -> ApacheServer:
        """An Apache with this configuration, not started yet."""
        run_dir = public_dir("apache")
        self.dirs.append(run_dir)
        port = free_port()
        conf = run_dir / "httpd.conf"
        conf.write_text(
            self.config(body, run_dir=run_dir, port=port, top=top, instance_dir=instance_dir)
        )
        server = ApacheServer(run_dir, conf, port)
        self.servers.append(server)
        return server

    def start(self, body: str, *, top: str = "", instance_dir: bool = True) -> ApacheServer:
        server = self.make(body, top=top, instance_dir=instance_dir)
        server.start()
        return server

    def config_test(
        self, body: str, *, top: str = "", without: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """``apache2 -t`` on a configuration, leaving out the lines that contain any of
        ``without``."""
        run_dir = public_dir("apache")
        self.dirs.append(run_dir)
        conf = run_dir / "httpd.conf"
        text = self.config(body, run_dir=run_dir, port=free_port(), top=top)
        lines = [line for line in text.splitlines() if not any(w in line for w in without)]
        conf.write_text("\n".join(lines) + "\n")
        return subprocess.run(
            ["apache2", "-t", "-f", str(conf)], capture_output=True, text=True, timeout=30
        )

    def close(self) -> None:
        errors = []
        for server in self.servers:
            try:
                server.stop()
            except AssertionError as exc:
                errors.append(str(exc))
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)
        if errors:
            raise AssertionError("\n".join(errors))


def vhost(name: str, docroot: Path, inner: str = "") -> str:
    """A <VirtualHost> on the test's port for ServerName ``name``."""
    return (
        f'<VirtualHost *>\n    ServerName {name}\n    DocumentRoot "{docroot}"\n'
        f'    <Directory "{docroot}">\n        Require all granted\n    </Directory>\n'
        f"{inner}</VirtualHost>\n"
    )


def json_of(resp: Response) -> dict[str, object]:
    import json

    assert resp.status == 200, (resp.status, resp.body[:500])
    data = json.loads(resp.body)
    assert isinstance(data, dict)
    return data


def error_line(text: str) -> str:
    """The syntax error Apache printed for ``apache2 -t``."""
    match = re.search(r"Syntax error on line \d+ of [^:]+:\n(.*)", text)
    return match.group(1) if match else text


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _setting_lines(mount: Mount, indent: str) -> list[str]:
    """The AppManager* directives of a mount's settings and environment."""
    from appmanager import connectorgen, settings

    lines = [f'{indent}AppManagerAppRoot "{mount.root}"']
    if mount.base_uri:
        lines.append(f"{indent}AppManagerBaseURI {_quote(mount.base_uri)}")
    for name, value in mount.settings.items():
        directive = connectorgen.apache_names(settings.BY_NAME[name])[0]
        lines.append(f"{indent}{directive} {_quote(value)}")
    for env_name, env_value in mount.env.items():
        lines.append(f"{indent}AppManagerEnvVar {env_name} {_quote(env_value)}")
    return lines


def mounts_config(mounts: list[Mount], empty_root: Path) -> str:
    """Virtual hosts for the shared suite's mounts: one per server name (localhost first, so
    that it answers unknown hosts), the app at "/" over the whole host but its sub-URIs, each
    sub-URI app in a <Location> with its public/ aliased."""
    names = sorted({m.server_name for m in mounts}, key=lambda n: n != "localhost")
    out = []
    for name in names:
        here = [m for m in mounts if m.server_name == name]
        root_app = next((m for m in here if not m.base_uri), None)
        subs = [m for m in here if m.base_uri]
        docroot = root_app.root / "public" if root_app else empty_root
        lines = [
            "<VirtualHost *>",
            f"    ServerName {name}",
            # An app's encoded slashes reach it as sent (by default Apache answers 404; a
            # virtual host does not inherit this from the server).
            "    AllowEncodedSlashes NoDecode",
            f'    DocumentRoot "{docroot}"',
            f'    <Directory "{docroot}">\n        Require all granted\n    </Directory>',
        ]
        if root_app is not None:
            # A <Location> inside another inherits its settings: the root app's section
            # leaves the sub-URIs out.
            prefixes = "|".join(re.escape(m.base_uri.strip("/")) for m in subs)
            pattern = f"^/(?!({prefixes})(/|$))" if subs else "^/"
            lines.append(f"    <LocationMatch {_quote(pattern)}>")
            lines.append("        AppManagerEnabled on")
            lines += _setting_lines(root_app, "        ")
            lines.append("    </LocationMatch>")
        for sub in subs:
            public = sub.root / "public"
            lines.append(f'    Alias {_quote(sub.base_uri)} "{public}"')
            lines.append(
                f'    <Directory "{public}">\n        Require all granted\n    </Directory>'
            )
            lines.append(f"    <Location {_quote(sub.base_uri)}>")
            lines.append("        AppManagerEnabled on")
            lines += _setting_lines(sub, "        ")
            lines.append("    </Location>")
        lines.append("</VirtualHost>")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


class ApacheSuiteServer(ApacheServer):
    """An ApacheServer as the shared suite drives it (webserver.WebServer)."""

    factory: ApacheFactory
    empty_root: Path

    def request(self, raw: bytes, timeout: float = 60.0) -> Response:  # type: ignore[override]
        return request(self.port, raw, timeout=timeout)

    def core_socket(self) -> str:
        return str(self.run_dir / "instance" / "connector.sock")

    def reload(self, mounts: list[Mount]) -> None:
        self.graceful(
            self.factory.config(
                mounts_config(mounts, self.empty_root), run_dir=self.run_dir, port=self.port
            )
        )


class ApacheKind:
    """Apache for the shared suite (webserver.WebServerKind)."""

    name = "apache"

    def __init__(self) -> None:
        self.factory = ApacheFactory()

    @staticmethod
    def missing() -> str | None:
        return missing()

    def site(self) -> Path:
        """A world-readable directory for apps; removed at close."""
        return self.factory.site()

    def start(self, mounts: list[Mount]) -> ApacheSuiteServer:
        empty_root = self.factory.site()
        run_dir = public_dir("apache")
        self.factory.dirs.append(run_dir)
        port = free_port()
        conf = run_dir / "httpd.conf"
        conf.write_text(
            self.factory.config(mounts_config(mounts, empty_root), run_dir=run_dir, port=port)
        )
        server = ApacheSuiteServer(run_dir, conf, port)
        server.factory = self.factory
        server.empty_root = empty_root
        self.factory.servers.append(server)
        server.start()
        return server

    def close(self) -> None:
        self.factory.close()
