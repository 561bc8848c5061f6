"""Apache: building ``mod_appmanager`` and writing an Apache configuration that uses it.

``appmanager apache-module build`` compiles ``integrations/apache/`` with ``apxs`` (Debian's
``apache2-dev``) into ``mod_appmanager.so``, with this installation's ``appmanager`` executable as
the core command the module starts by default. Builds are cached by the hash of what goes into
them, so a second build is a file lookup.

``appmanager apache-config`` prints a self-contained Apache configuration (its own ServerRoot,
pid file, logs, modules) for one app or for the apps of an ``appmanager.toml``: one virtual host
per set of server names, one ``<Location>`` per ``base_uri``.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from appmanager import connectorgen, settings

PACKAGE_DIR = Path(__file__).resolve().parent


def _integrations_dir() -> Path:
    """integrations/: package data in a wheel (appmanager/integrations), beside the package in
    a checkout or an editable install."""
    for candidate in (PACKAGE_DIR / "integrations", PACKAGE_DIR.parent / "integrations"):
        if (candidate / "apache").is_dir():
            return candidate
    return PACKAGE_DIR.parent / "integrations"


# The module's C sources and the generated directive table they include.
SOURCE_DIR = _integrations_dir() / "apache"
DEF_PATH = _integrations_dir() / "appmanager_directives.def"
MODULE_NAME = "mod_appmanager.so"
# Apache modules the printed configuration loads, when the system has them as files.
CONFIG_MODULES = (
    ("mpm_event_module", "mod_mpm_event.so"),
    ("authz_core_module", "mod_authz_core.so"),
    ("mime_module", "mod_mime.so"),
    ("dir_module", "mod_dir.so"),
    ("alias_module", "mod_alias.so"),
    ("env_module", "mod_env.so"),
    ("proxy_module", "mod_proxy.so"),
    ("proxy_http_module", "mod_proxy_http.so"),
)
DEFAULT_MODULES_DIR = "/usr/lib/apache2/modules"


class ApacheError(Exception):
    """The module cannot be built or the configuration cannot be written; the message says why
    and what to install."""


def default_core_command() -> str:
    """The ``appmanager`` executable of this installation: next to the running interpreter (a
    virtual environment's bin/), else the one on the PATH."""
    beside = Path(sys.executable).parent / "appmanager"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("appmanager")
    return found or "appmanager"


def find_apxs() -> str:
    """The ``apxs`` tool, or ApacheError naming the package that provides it."""
    for name in ("apxs", "apxs2"):
        found = shutil.which(name)
        if found:
            return found
    raise ApacheError(
        "apxs not found: building the Apache module needs Apache's development files "
        "(Debian and Ubuntu: apt-get install apache2-dev)"
    )


def _sources() -> list[Path]:
    if not SOURCE_DIR.is_dir():
        raise ApacheError(f"the module's sources are not in {SOURCE_DIR}")
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".c", ".h"))


def _build_key(apxs: str, core_command: str) -> str:
    """What makes one build differ from another: the sources, the directive table, the core
    command compiled in, and the Apache it is built for."""
    digest = hashlib.sha256()
    for path in [*_sources(), DEF_PATH]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(core_command.encode() + b"\0" + os.path.realpath(apxs).encode())
    return digest.hexdigest()[:20]


def cache_dir() -> Path:
    """Where built modules are kept: $XDG_CACHE_HOME/appmanager/apache-module (~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "appmanager" / "apache-module"


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_module(output: str | Path | None = None, core_command: str | None = None) -> Path:
    """Build (or find in the cache) ``mod_appmanager.so`` and return its path; with ``output``,
    a copy in that directory."""
    apxs = find_apxs()
    command = core_command or default_core_command()
    key = _build_key(apxs, command)
    cached = cache_dir() / key / MODULE_NAME
    if not cached.is_file():
        _compile(apxs, command, cached)
    if output is None:
        return cached
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / MODULE_NAME
    tmp = out_dir / f".{MODULE_NAME}.{os.getpid()}"
    shutil.copyfile(cached, tmp)
    os.replace(tmp, target)
    return target


def _compile(apxs: str, core_command: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="appmanager-apache-build.") as build:
        build_dir = Path(build)
        for path in _sources():
            shutil.copy(path, build_dir / path.name)
        (build_dir / "am_build.h").write_text(
            "/* Written by `appmanager apache-module build`. */\n"
            f"#define AM_DEFAULT_CORE_COMMAND {_c_string(core_command)}\n"
        )
        sources = [p.name for p in _sources() if p.suffix == ".c"]
        cmd = [
            apxs,
            "-c",
            "-o",
            "mod_appmanager.la",
            f"-I{DEF_PATH.parent}",
            f"-I{build_dir}",
            "-Wc,-Wall",
            *sources,
        ]
        result = subprocess.run(cmd, cwd=build_dir, capture_output=True, text=True)
        built = build_dir / ".libs" / MODULE_NAME
        if result.returncode != 0 or not built.is_file():
            raise ApacheError(
                f"building the Apache module failed ({' '.join(cmd)}):\n"
                + (result.stdout + result.stderr)[-4000:]
            )
        # Another build may finish at the same time: each writes its own file, then renames.
        tmp = target.parent / f".{MODULE_NAME}.{os.getpid()}"
        shutil.copyfile(built, tmp)
        os.replace(tmp, target)


def modules_dir() -> str:
    """Where Apache's own modules are (apxs's LIBEXECDIR)."""
    try:
        apxs = find_apxs()
        out = subprocess.run([apxs, "-q", "LIBEXECDIR"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except ApacheError:
        pass
    return DEFAULT_MODULES_DIR


def apache_directive(name: str) -> str:
    """The ``AppManager<Name>`` directive of a setting."""
    return connectorgen.apache_names(settings.BY_NAME[name])[0]


def quote(value: str) -> str:
    """A directive argument as Apache reads it: quoted, with backslashes and quotes escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _directive_lines(values: dict[str, Any], role: str) -> list[str]:
    """Directives for the settings of ``role`` (``app`` or ``core``) that differ from their
    defaults, in the registry's order."""
    lines = []
    for setting in connectorgen.directive_settings():
        if setting.connector_role != role or setting.name in ("app_root", "base_uri"):
            continue
        value = values.get(setting.name)
        if value is None or value == setting.default or value in ((), {}):
            continue
        directive = apache_directive(setting.name)
        if setting.type == "env":
            for env_name, env_value in value.items():
                lines.append(f"{directive} {env_name} {quote(str(env_value))}")
        elif setting.type == "list":
            lines.append(f"{directive} " + " ".join(quote(str(v)) for v in value))
        elif setting.type == "bool":
            lines.append(f"{directive} {'on' if value else 'off'}")
        else:
            shown = str(int(value)) if isinstance(value, float) and value.is_integer() else value
            lines.append(f"{directive} {quote(str(shown))}")
    return lines


@dataclass
class AppBlock:
    """One app in the printed configuration."""

    name: str
    root: str
    public: str
    base_uri: str
    directives: list[str]


@dataclass
class VirtualHost:
    """One ``<VirtualHost>``: the apps that answer to one set of server names."""

    server_names: tuple[str, ...]
    apps: list[AppBlock] = field(default_factory=list)

    @property
    def root_app(self) -> AppBlock | None:
        for app in self.apps:
            if not app.base_uri:
                return app
        return None

    @property
    def sub_apps(self) -> list[AppBlock]:
        return [app for app in self.apps if app.base_uri]

    @property
    def root_location(self) -> str:
        """A pattern matching every path but the sub-apps' (so that the root app's settings do
        not reach them: a <Location> inside another inherits its settings)."""
        prefixes = "|".join(app.base_uri.lstrip("/") for app in self.sub_apps)
        return f"^/(?!({prefixes})(/|$))"


def render_config(
    plan: Any,
    *,
    module: str,
    run_dir: str,
    apache_user: str | None,
    apache_group: str | None,
) -> str:
    """The Apache configuration for a ``config.Plan``."""
    values = plan.settings
    hosts: dict[tuple[str, ...], VirtualHost] = {}
    for app in plan.apps:
        host = hosts.setdefault(app.server_names, VirtualHost(app.server_names))
        host.apps.append(
            AppBlock(
                app.name,
                app.spec.root,
                os.path.join(app.spec.root, "public"),
                app.base_uri,
                _directive_lines(app.settings, "app"),
            )
        )
    # Apache answers a Host no virtual host names with the first one: the apps without
    # server names come first.
    ordered = sorted(hosts.values(), key=lambda h: len(h.server_names) > 0)
    import jinja2

    mods = modules_dir()
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("appmanager", "templates"),
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("apache.conf.j2").render(
        run_dir=run_dir,
        address=values["address"],
        port=values["port"],
        apache_user=apache_user,
        apache_group=apache_group,
        modules=[
            (name, os.path.join(mods, file))
            for name, file in CONFIG_MODULES
            if os.path.isfile(os.path.join(mods, file))
        ],
        module=module,
        core_directives=_directive_lines(values, "core"),
        instance_dir=values.get("instance_dir"),
        hosts=ordered,
        quote=quote,
    )


def _default_apache_user() -> tuple[str | None, str | None]:
    """As root, Apache's children need a user of their own: www-data (Debian's), else nobody."""
    if os.geteuid() != 0:
        return None, None
    for user in ("www-data", "nobody"):
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            continue
        import grp

        try:
            group = grp.getgrgid(entry.pw_gid).gr_name
        except KeyError:
            group = "nogroup"
        return user, group
    return None, None


def _config_options(func: Any) -> Any:
    """One option per app- and core-role setting, as ``appmanager start`` spells them."""
    for setting in reversed(settings.SETTINGS):
        if not setting.cli or setting.connector_role not in ("app", "core"):
            continue
        if setting.type in ("list", "env"):
            option = click.option(
                setting.option,
                setting.name,
                multiple=True,
                metavar=setting.metavar or "VALUE",
                help=setting.doc + " (repeatable)",
            )
        else:
            option = click.option(
                setting.option,
                setting.name,
                default=None,
                metavar=setting.metavar or setting.type.upper(),
                help=setting.doc,
            )
        func = option(func)
    return func


def _fail(message: str) -> None:
    click.echo(f"appmanager: {message}", err=True)
    sys.exit(1)


@click.group("apache-module")
def apache_module() -> None:
    """The Apache module (mod_appmanager)."""


@apache_module.command("build")
@click.option(
    "--output",
    metavar="DIR",
    default=None,
    help="Put mod_appmanager.so in DIR (default: it stays in the build cache).",
)
@click.option(
    "--core-command",
    metavar="PATH",
    default=None,
    help="The appmanager executable the module starts by default (default: this one).",
)
def build_command(output: str | None, core_command: str | None) -> None:
    """Build mod_appmanager.so with apxs (apache2-dev); prints its path as the last line."""
    try:
        path = build_module(output, core_command)
    except ApacheError as exc:
        _fail(str(exc))
    click.echo(f"LoadModule appmanager_module {path}", err=True)
    click.echo(str(path))


@click.command("apache-config")
@click.argument("app_dir", required=False, default=None, type=click.Path(file_okay=False))
@click.option("--config", "config_file", metavar="FILE", default=None, help="An appmanager.toml.")
@click.option("--address", default=None, metavar="HOST", help="The address Apache listens on.")
@click.option("--port", "-p", default=None, metavar="PORT", help="The port Apache listens on.")
@click.option(
    "--run-dir",
    default=None,
    metavar="DIR",
    help="Apache's ServerRoot: pid file, logs, locks (default: a directory under the system's "
    "temporary directory named for the port; created).",
)
@click.option(
    "--module",
    "module_path",
    default=None,
    metavar="FILE",
    help="mod_appmanager.so (default: build it, or take it from the build cache).",
)
@click.option("--apache-user", default=None, metavar="NAME", help="User of Apache's children.")
@click.option("--apache-group", default=None, metavar="NAME", help="Their group.")
@_config_options
def apache_config(
    app_dir: str | None,
    config_file: str | None,
    address: str | None,
    port: str | None,
    run_dir: str | None,
    module_path: str | None,
    apache_user: str | None,
    apache_group: str | None,
    **raw: Any,
) -> None:
    """Print a self-contained Apache configuration serving the app in APP_DIR (default: the
    current directory), or the apps of --config FILE; run it with
    `apache2 -DFOREGROUND -f FILE`."""
    from appmanager.config import ConfigError, build

    raw.update({"config": config_file, "address": address, "port": port})
    try:
        plan = build(app_dir, raw)
    except (settings.SettingError, ConfigError) as exc:
        _fail(str(exc))
    try:
        module = module_path or str(build_module())
    except ApacheError as exc:
        _fail(str(exc))
    run = run_dir or os.path.join(
        tempfile.gettempdir(), f"appmanager-apache-{plan.settings['port']}"
    )
    run = os.path.abspath(run)
    os.makedirs(run, exist_ok=True)
    # Apache's children (another user, when started as root) open its lock files here.
    os.chmod(run, 0o755)
    os.makedirs(os.path.join(run, "htdocs"), exist_ok=True)
    default_user, default_group = _default_apache_user()
    click.echo(
        render_config(
            plan,
            module=module,
            run_dir=run,
            apache_user=apache_user or default_user,
            apache_group=apache_group or default_group,
        ),
        nl=False,
    )
