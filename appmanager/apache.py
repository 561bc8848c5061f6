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

import os
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click

from appmanager import connectorcli, connectorgen, settings
from appmanager.connectorbuild import (
    BuildError,
    build_key,
    cached_build,
    copy_sources,
    default_core_command,
)
from appmanager.connectorconf import (
    Host,
    changed_settings,
    group_hosts,
    quote,
    render_template,
    shown,
)

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


def find_apxs() -> str:
    """The ``apxs`` tool, or BuildError naming the package that provides it."""
    for name in ("apxs", "apxs2"):
        found = shutil.which(name)
        if found:
            return found
    raise BuildError(
        "apxs not found: building the Apache module needs Apache's development files "
        "(Debian and Ubuntu: apt-get install apache2-dev)"
    )


def build_module(output: str | Path | None = None, core_command: str | None = None) -> Path:
    """Build (or find in the cache) ``mod_appmanager.so`` and return its path; with ``output``,
    a copy in that directory. The build key hashes the sources, the core command compiled in
    and the Apache it is built for (its apxs)."""
    apxs = find_apxs()
    command = core_command or default_core_command()
    key = build_key("apache", command, os.path.realpath(apxs))
    return cached_build(
        "apache", key, MODULE_NAME, lambda build_dir: _compile(apxs, command, build_dir), output
    )


def _compile(apxs: str, core_command: str, build_dir: Path) -> Path:
    module_dir = copy_sources("apache", build_dir)
    # A C string literal escapes the same characters as a directive argument.
    (module_dir / "am_build.h").write_text(
        "/* Written by `appmanager apache-module build`. */\n"
        f"#define AM_DEFAULT_CORE_COMMAND {quote(core_command)}\n"
    )
    sources = sorted(p.name for p in module_dir.glob("*.c"))
    # The directive table is included from the sources' parent directory.
    cmd = [apxs, "-c", "-o", "mod_appmanager.la", f"-I{build_dir}", "-Wc,-Wall", *sources]
    result = subprocess.run(cmd, cwd=module_dir, capture_output=True, text=True)
    built = module_dir / ".libs" / MODULE_NAME
    if result.returncode != 0 or not built.is_file():
        raise BuildError(
            f"building the Apache module failed ({' '.join(cmd)}):\n"
            + (result.stdout + result.stderr)[-4000:]
        )
    return built


def modules_dir() -> str:
    """Where Apache's own modules are (apxs's LIBEXECDIR)."""
    try:
        apxs = find_apxs()
        out = subprocess.run([apxs, "-q", "LIBEXECDIR"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except BuildError:
        pass
    return DEFAULT_MODULES_DIR


def apache_directive(name: str) -> str:
    """The ``AppManager<Name>`` directive of a setting."""
    return connectorgen.apache_names(settings.BY_NAME[name])[0]


def _directive_lines(values: dict[str, Any], role: str) -> list[str]:
    """Directives for the settings of ``role`` (``app`` or ``core``) that differ from their
    defaults, in the registry's order."""
    lines = []
    # The template writes the instance directory itself (as nginx's does).
    for setting, value in changed_settings(values, role, ("app_root", "base_uri", "instance_dir")):
        directive = apache_directive(setting.name)
        if setting.type == "env":
            for env_name, env_value in value.items():
                lines.append(f"{directive} {env_name} {quote(str(env_value))}")
        elif setting.type == "list":
            lines.append(f"{directive} " + " ".join(quote(str(v)) for v in value))
        elif setting.type == "bool":
            lines.append(f"{directive} {'on' if value else 'off'}")
        else:
            lines.append(f"{directive} {quote(shown(value))}")
    return lines


class VirtualHost(Host):
    """One ``<VirtualHost>``: the apps that answer to one set of server names."""

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
    mods = modules_dir()
    return render_template(
        "apache.conf.j2",
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
        hosts=group_hosts(plan, _directive_lines, VirtualHost),
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


apache_module = connectorcli.module_group(
    "apache",
    about="The Apache module (mod_appmanager).",
    file_name=MODULE_NAME,
    build=build_module,
    load="LoadModule appmanager_module {path}",
    build_help=(
        "Build mod_appmanager.so with apxs (apache2-dev); prints its path as the last line."
    ),
)


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
    raw.update({"config": config_file, "address": address, "port": port})
    plan, module = connectorcli.plan_and_module(app_dir, raw, module_path, build_module)
    # Apache's children (another user, when started as root) open its lock files here.
    run = connectorcli.run_dir(run_dir, "apache", plan.settings["port"], 0o755)
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
