"""A real nginx with appmanager's module, for the connector tests.

Each server is self-contained: its own nginx.conf, pid file, error log and temporary paths in a
fresh world-traversable directory (nginx's workers run as nobody when the tests run as root), a
free port on loopback, nginx in the foreground. The module is built once per test session (and
cached across sessions by ``appmanager.nginxbuild``). Stopping a server waits until the core it
started, and the core's apps, have exited.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from conftest import HttpReader, Response, free_port, request
from webserver import Mount, public_dir

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def missing() -> str | None:
    """Why nginx tests cannot run here, or None."""
    if not os.access(NGINX, os.X_OK):
        return "nginx is not installed"
    if not os.path.isfile("/usr/share/nginx/src/configure"):
        return "nginx-dev is not installed"
    if not (shutil.which("cc") or shutil.which("gcc")) or not shutil.which("make"):
        return "no C compiler or make"
    return None


@functools.cache
def module_path() -> Path:
    """The module, built once per test session (and cached across sessions)."""
    from appmanager.nginxbuild import build_module

    return build_module()


def quote(value: str | Path) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class NginxServer:
    """One nginx under test, and the core its module started (none with a core socket)."""

    run_dir: Path
    conf_path: Path
    port: int
    tls: bool = False
    proc: subprocess.Popen[bytes] | None = None
    core_pids: set[int] = field(default_factory=set)

    @property
    def error_log_path(self) -> Path:
        return self.run_dir / "error.log"

    def error_log(self) -> str:
        return _read(self.error_log_path)

    def core_log(self) -> str:
        return _read(self.run_dir / "core.log")

    def logs(self) -> str:
        return (
            f"--- nginx error log ---\n{self.error_log()[-5000:]}\n"
            f"--- core log ---\n{self.core_log()[-5000:]}\n"
            f"--- nginx stderr ---\n{_read(self.run_dir / 'stderr.log')[-2000:]}"
        )

    def request(self, raw: bytes, timeout: float = 60.0) -> Response:
        if not self.tls:
            return request(self.port, raw, timeout=timeout)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as raw_sock,
            context.wrap_socket(raw_sock, server_hostname="localhost") as sock,
        ):
            sock.sendall(raw)
            return HttpReader(sock).read()  # type: ignore[arg-type]

    def get(self, path: str = "/", host: str = "localhost", headers: str = "") -> Response:
        raw = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n"
        return self.request(raw.encode())

    def core(self) -> psutil.Process | None:
        """The core started by this nginx's module: the master's child with a lifeline."""
        if self.proc is None:
            return None
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return None
        for child in children:
            try:
                if "--lifeline-fd" in child.cmdline():
                    return child
            except psutil.Error:
                continue
        return None

    def core_socket(self) -> str:
        return str(self.run_dir / "instance" / "connector.sock")

    def workers(self) -> set[int]:
        if self.proc is None:
            return set()
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return set()
        return {p.pid for p in children if _is_worker(p)}

    def start(self, timeout: float = 60.0, env: dict[str, str] | None = None) -> None:
        with open(self.run_dir / "stderr.log", "wb") as stderr:
            self.proc = subprocess.Popen(
                [NGINX, "-p", str(self.run_dir), "-c", str(self.conf_path)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        deadline = time.monotonic() + timeout
        # nginx writes its pid file once its modules have started: the core listens by then.
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if (self.run_dir / "nginx.pid").exists() and self.workers():
                core = self.core()
                if core is not None:
                    self.core_pids.add(core.pid)
                return
            time.sleep(0.02)
        raise AssertionError(f"nginx did not start:\n{self.logs()}")

    def reload(self, conf: str | None = None, timeout: float = 30.0) -> None:
        """``nginx -s reload`` with ``conf``; returns when only new workers are left."""
        if conf is not None:
            self.conf_path.write_text(conf)
        old = self.workers()
        result = subprocess.run(
            [NGINX, "-p", str(self.run_dir), "-c", str(self.conf_path), "-s", "reload"],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = self.workers()
            if current and not current & old:
                return
            time.sleep(0.05)
        raise AssertionError(f"nginx did not reload:\n{self.logs()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop nginx, then wait until its core and the core's apps have exited."""
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
            raise AssertionError(f"nginx did not stop:\n{self.logs()}") from None
        _, alive = psutil.wait_procs(watched, timeout=timeout)
        alive = [p for p in alive if _running(p)]
        if alive:
            for p in alive:
                p.kill()
            raise AssertionError(f"left running after nginx stopped: {alive}\n{self.logs()}")
        for pid in self.core_pids:
            _reap(pid)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _is_worker(p: psutil.Process) -> bool:
    try:
        return "nginx: worker process" in " ".join(p.cmdline())
    except psutil.Error:
        return False


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
    """A core outlives nginx by a moment and is then re-parented to the test runner (a
    subreaper): collect its exit status."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


class NginxFactory:
    """Writes configurations and starts nginx servers; all are stopped and removed at close."""

    def __init__(self) -> None:
        self.servers: list[NginxServer] = []
        self.dirs: list[Path] = []

    def site(self) -> Path:
        """A world-readable directory for apps and document roots; removed at close."""
        path = public_dir("site")
        self.dirs.append(path)
        return path

    def config(
        self,
        body: str,
        *,
        run_dir: Path,
        port: int,
        top: str = "",
        core: bool = True,
        listen: str = "",
    ) -> str:
        """A whole nginx.conf: the self-contained base, ``top`` (http-level directives), then
        ``body`` (server blocks, in which ``LISTEN`` stands for the test's listen address).
        With ``core``, the core's instance directory and log are in the run directory."""
        lines = [
            f"load_module {quote(module_path())};",
            "daemon off;",
            "master_process on;",
            "worker_processes 1;",
            f"pid {quote(run_dir / 'nginx.pid')};",
            f"error_log {quote(run_dir / 'error.log')} info;",
            "worker_shutdown_timeout 5s;",
            "events { worker_connections 256; }",
            "http {",
            "    access_log off;",
            "    default_type application/octet-stream;",
            # Forged connector fields must reach the module, which drops them itself (nginx
            # would otherwise drop them as invalid names already).
            "    ignore_invalid_headers off;",
            "    client_max_body_size 0;",
        ]
        for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            lines.append(f"    {temp}_temp_path {quote(run_dir / temp)};")
        if core:
            lines += [
                f"    appmanager_instance_dir {quote(run_dir / 'instance')};",
                f"    appmanager_log_file {quote(run_dir / 'core.log')};",
                "    appmanager_shutdown_timeout 5;",
            ]
        if os.geteuid() == 0:
            # Apps run as the core's user (root): see tests/conftest.py.
            lines.append("    appmanager_user_switching off;")
        lines += [top, body.replace("LISTEN", listen or f"127.0.0.1:{port}"), "}", ""]
        return "\n".join(lines)

    def make(
        self, body: str, *, top: str = "", core: bool = True, tls: bool = False
    ) -> NginxServer:
        """An nginx with this configuration, not started yet."""
        run_dir = public_dir("nginx")
        self.dirs.append(run_dir)
        port = free_port()
        conf = run_dir / "nginx.conf"
        conf.write_text(self.config(body, run_dir=run_dir, port=port, top=top, core=core))
        server = NginxServer(run_dir, conf, port, tls=tls)
        self.servers.append(server)
        return server

    def start(self, body: str | list[Mount], *, top: str = "", core: bool = True) -> NginxServer:
        """A running nginx with server blocks ``body`` (text, or rendered from mounts)."""
        text = body if isinstance(body, str) else render_mounts(body)
        server = self.make(text, top=top, core=core)
        server.start()
        return server

    def rewrite(self, server: NginxServer, body: str | list[Mount], *, top: str = "") -> str:
        """The configuration of ``server`` with other server blocks."""
        text = body if isinstance(body, str) else render_mounts(body)
        return self.config(text, run_dir=server.run_dir, port=server.port, top=top)

    def config_test(self, body: str, *, top: str = "") -> subprocess.CompletedProcess[str]:
        """``nginx -t`` on a configuration."""
        run_dir = public_dir("nginx")
        self.dirs.append(run_dir)
        conf = run_dir / "nginx.conf"
        conf.write_text(self.config(body, run_dir=run_dir, port=free_port(), top=top))
        return subprocess.run(
            [NGINX, "-t", "-p", str(run_dir), "-c", str(conf)],
            capture_output=True,
            text=True,
            timeout=30,
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


class NginxSuiteServer:
    """The shared suite's view of one nginx (``webserver.WebServer``)."""

    def __init__(self, factory: NginxFactory, server: NginxServer) -> None:
        self.factory = factory
        self.server = server
        self.port = server.port

    def request(self, raw: bytes, timeout: float = 60.0) -> Response:
        return self.server.request(raw, timeout)

    def get(self, path: str = "/", host: str = "localhost", headers: str = "") -> Response:
        return self.server.get(path, host, headers)

    def core(self) -> psutil.Process | None:
        return self.server.core()

    def core_socket(self) -> str:
        return self.server.core_socket()

    def reload(self, mounts: list[Mount]) -> None:
        self.server.reload(self.factory.rewrite(self.server, mounts))

    def stop(self) -> None:
        self.server.stop()

    def logs(self) -> str:
        return self.server.logs()


class NginxKind:
    """nginx as one of the shared suite's web servers (``webserver.WebServerKind``)."""

    name = "nginx"

    def __init__(self) -> None:
        self.factory = NginxFactory()

    @staticmethod
    def missing() -> str | None:
        return missing()

    def site(self) -> Path:
        return self.factory.site()

    def start(self, mounts: list[Mount]) -> NginxSuiteServer:
        return NginxSuiteServer(self.factory, self.factory.start(mounts))

    def close(self) -> None:
        self.factory.close()


def render_mounts(mounts: list[Mount]) -> str:
    """nginx server blocks for ``mounts``: one per server name, one location per app."""
    by_name: dict[str, list[Mount]] = {}
    for mount in mounts:
        by_name.setdefault(mount.server_name, []).append(mount)
    blocks = []
    for name, apps in by_name.items():
        lines = ["server {", "    listen LISTEN;", f"    server_name {name};"]
        for app in apps:
            public = app.root / "public"
            if app.base_uri:
                lines += [
                    f'    location ~ "^{app.base_uri}(/.*|$)" {{',
                    f"        alias {quote(str(public) + '$1')};",
                    f"        appmanager_base_uri {quote(app.base_uri)};",
                ]
            else:
                lines += ["    location / {", f"        root {quote(public)};"]
            lines += [
                "        appmanager_enabled on;",
                f"        appmanager_app_root {quote(app.root)};",
            ]
            lines += [f"        appmanager_{k} {quote(v)};" for k, v in app.settings.items()]
            lines += [f"        appmanager_env_var {k} {quote(v)};" for k, v in app.env.items()]
            lines.append("    }")
        lines.append("}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


@pytest.fixture(name="nginx")
def nginx_fixture() -> Iterator[NginxFactory]:
    """Start nginx servers with appmanager's module; all are stopped (with their cores)
    after the test."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    factory = NginxFactory()
    yield factory
    factory.close()
