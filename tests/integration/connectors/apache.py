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
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from conftest import Response, free_port
from webserver import ServerFactory, ServerKind, ServerProcess, quote

from appmanager.apache import CONFIG_MODULES

if TYPE_CHECKING:
    from webserver import Mount

MODULES_DIR = Path("/usr/lib/apache2/modules")
# What `appmanager apache-config` loads, and mod_rewrite for the tests of rewritten requests.
BASE_MODULES = (*CONFIG_MODULES, ("rewrite_module", "mod_rewrite.so"))
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
class ApacheServer(ServerProcess):
    """One Apache under test, and the core its module started (none with a core socket)."""

    name: ClassVar[str] = "Apache"

    def command(self) -> list[str]:
        return ["apache2", "-DFOREGROUND", "-f", str(self.conf_path)]

    def serves(self) -> bool:
        return READY in self.error_log()

    def reconfigure(self, conf: str | None = None, timeout: float = 30.0) -> None:
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
        self.wait_until(lambda: self.error_log().count(READY) > before, timeout, "did not reload")
        self.note_core()


class ApacheFactory(ServerFactory[ApacheServer]):
    """Writes configurations and starts Apaches; everything is stopped and removed at close."""

    server_type = ApacheServer
    conf_name = "httpd.conf"

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
        return self.new_server(
            lambda run_dir, port: self.config(
                body, run_dir=run_dir, port=port, top=top, instance_dir=instance_dir
            )
        )

    def start(self, body: str, *, top: str = "", instance_dir: bool = True) -> ApacheServer:
        server = self.make(body, top=top, instance_dir=instance_dir)
        server.start()
        return server

    def config_test(
        self, body: str, *, top: str = "", without: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """``apache2 -t`` on a configuration, leaving out the lines that contain any of
        ``without``."""
        run_dir = self.new_dir("apache")
        conf = run_dir / "httpd.conf"
        text = self.config(body, run_dir=run_dir, port=free_port(), top=top)
        lines = [line for line in text.splitlines() if not any(w in line for w in without)]
        conf.write_text("\n".join(lines) + "\n")
        return subprocess.run(
            ["apache2", "-t", "-f", str(conf)], capture_output=True, text=True, timeout=30
        )


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


def _setting_lines(mount: Mount, indent: str) -> list[str]:
    """The AppManager* directives of a mount's settings and environment."""
    from appmanager import connectorgen, settings

    lines = [f'{indent}AppManagerAppRoot "{mount.root}"']
    if mount.base_uri:
        lines.append(f"{indent}AppManagerBaseURI {quote(mount.base_uri)}")
    for name, value in mount.settings.items():
        directive = connectorgen.apache_names(settings.BY_NAME[name])[0]
        lines.append(f"{indent}{directive} {quote(value)}")
    for env_name, env_value in mount.env.items():
        lines.append(f"{indent}AppManagerEnvVar {env_name} {quote(env_value)}")
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
            lines.append(f"    <LocationMatch {quote(pattern)}>")
            lines.append("        AppManagerEnabled on")
            lines += _setting_lines(root_app, "        ")
            lines.append("    </LocationMatch>")
        for sub in subs:
            public = sub.root / "public"
            lines.append(f'    Alias {quote(sub.base_uri)} "{public}"')
            lines.append(
                f'    <Directory "{public}">\n        Require all granted\n    </Directory>'
            )
            lines.append(f"    <Location {quote(sub.base_uri)}>")
            lines.append("        AppManagerEnabled on")
            lines += _setting_lines(sub, "        ")
            lines.append("    </Location>")
        lines.append("</VirtualHost>")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


class ApacheKind(ServerKind[ApacheFactory]):
    """Apache for the shared suite (webserver.WebServerKind)."""

    name = "apache"
    factory_type = ApacheFactory

    @staticmethod
    def missing() -> str | None:
        return missing()

    def start(self, mounts: list[Mount]) -> ApacheServer:
        empty_root = self.factory.site()

        def render(mounts: list[Mount], run_dir: Path, port: int) -> str:
            return self.factory.config(
                mounts_config(mounts, empty_root), run_dir=run_dir, port=port
            )

        server = self.factory.new_server(lambda run_dir, port: render(mounts, run_dir, port))
        server.render = lambda mounts: render(mounts, server.run_dir, server.port)
        server.start()
        return server
