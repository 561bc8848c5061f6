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
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import psutil
import pytest
from conftest import HttpReader, Response, free_port
from webserver import Mount, ServerFactory, ServerKind, ServerProcess, quote

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


@dataclass
class NginxServer(ServerProcess):
    """One nginx under test, and the core its module started (none with a core socket)."""

    tls: bool = False

    name: ClassVar[str] = "nginx"

    def command(self) -> list[str]:
        return [NGINX, "-p", str(self.run_dir), "-c", str(self.conf_path)]

    def serves(self) -> bool:
        # nginx writes its pid file once its modules have started: the core listens by then.
        return (self.run_dir / "nginx.pid").exists() and bool(self.workers())

    def request(self, raw: bytes, timeout: float = 60.0) -> Response:
        if not self.tls:
            return super().request(raw, timeout)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as raw_sock,
            context.wrap_socket(raw_sock, server_hostname="localhost") as sock,
        ):
            sock.sendall(raw)
            return HttpReader(sock).read()  # type: ignore[arg-type]

    def workers(self) -> set[int]:
        if self.proc is None:
            return set()
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return set()
        return {p.pid for p in children if _is_worker(p)}

    def reconfigure(self, conf: str | None = None, timeout: float = 30.0) -> None:
        """``nginx -s reload`` with ``conf``; returns when only new workers are left."""
        if conf is not None:
            self.conf_path.write_text(conf)
        old = self.workers()
        result = subprocess.run([*self.command(), "-s", "reload"], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr

        def replaced() -> bool:
            current = self.workers()
            return bool(current) and not current & old

        self.wait_until(replaced, timeout, "did not reload")


def _is_worker(p: psutil.Process) -> bool:
    try:
        return "nginx: worker process" in " ".join(p.cmdline())
    except psutil.Error:
        return False


class NginxFactory(ServerFactory[NginxServer]):
    """Writes configurations and starts nginx servers; all are stopped and removed at close."""

    server_type = NginxServer
    conf_name = "nginx.conf"

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
        return self.new_server(
            lambda run_dir, port: self.config(body, run_dir=run_dir, port=port, top=top, core=core),
            tls=tls,
        )

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
        run_dir = self.new_dir("nginx")
        conf = run_dir / "nginx.conf"
        conf.write_text(self.config(body, run_dir=run_dir, port=free_port(), top=top))
        return subprocess.run(
            [NGINX, "-t", "-p", str(run_dir), "-c", str(conf)],
            capture_output=True,
            text=True,
            timeout=30,
        )


class NginxKind(ServerKind[NginxFactory]):
    """nginx as one of the shared suite's web servers (``webserver.WebServerKind``)."""

    name = "nginx"
    factory_type = NginxFactory

    @staticmethod
    def missing() -> str | None:
        return missing()

    def start(self, mounts: list[Mount]) -> NginxServer:
        server = self.factory.start(mounts)
        server.render = lambda mounts: self.factory.rewrite(server, mounts)
        return server


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
