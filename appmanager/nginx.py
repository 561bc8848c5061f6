"""The nginx connector's commands: ``appmanager nginx-module build`` and ``nginx-config``, and
the entry point of ``appmanager start --engine nginx``.

The work is in ``nginxbuild`` (building the module), ``nginxconf`` (writing a configuration)
and ``nginxengine`` (running nginx in front of the core); this module only turns them into
commands. ``nginx-config`` takes the options of ``start``; ``cli.py`` hands it the decorator
that makes them, so that they are declared once.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import click

from appmanager import settings

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _fail(message: str) -> None:
    click.echo(f"appmanager: {message}", err=True)
    sys.exit(1)


@click.group("nginx-module")
def nginx_module() -> None:
    """appmanager's nginx module."""


@nginx_module.command("build")
@click.option(
    "--output",
    metavar="DIR",
    default=None,
    help="Put ngx_http_appmanager_module.so in DIR (default: it stays in the build cache).",
)
@click.option(
    "--core-command",
    metavar="PATH",
    default=None,
    help="The appmanager executable the module starts by default (default: this one).",
)
def build_command(output: str | None, core_command: str | None) -> None:
    """Build the module for the installed nginx (needs nginx-dev and a C compiler); prints
    the module's path as the last line."""
    from appmanager.nginxbuild import NginxBuildError, build_module

    try:
        path = build_module(output, core_command)
    except NginxBuildError as exc:
        _fail(str(exc))
    click.echo(f"load_module {path};", err=True)
    click.echo(str(path))


def nginx_config_command(setting_options: Decorator) -> click.Command:
    """``appmanager nginx-config``, with ``start``'s options made by ``setting_options``."""

    @click.command("nginx-config")
    @click.argument("app_dir", required=False, default=None, type=click.Path(file_okay=False))
    @click.option(
        "--run-dir",
        default=None,
        metavar="DIR",
        help="Where nginx writes its pid file, logs and temporary files (default: a directory "
        "under the system's temporary directory named for the port; created).",
    )
    @click.option(
        "--module",
        "module_path",
        default=None,
        metavar="FILE",
        help="The module (default: build it, or take it from the build cache).",
    )
    @setting_options
    def nginx_config(
        app_dir: str | None, run_dir: str | None, module_path: str | None, **raw: Any
    ) -> None:
        """Print an nginx configuration serving the app in APP_DIR (default: the current
        directory) the way `appmanager start --engine nginx` does; run it with
        `nginx -p RUN_DIR -c FILE`."""
        from appmanager.config import ConfigError, build
        from appmanager.nginxbuild import NginxBuildError, build_module
        from appmanager.nginxconf import render

        try:
            plan = build(app_dir, raw)
        except (settings.SettingError, ConfigError) as exc:
            _fail(str(exc))
        try:
            module = module_path or str(build_module())
        except NginxBuildError as exc:
            _fail(str(exc))
        values = plan.settings
        run = os.path.abspath(
            run_dir or os.path.join(tempfile.gettempdir(), f"appmanager-nginx-{values['port']}")
        )
        os.makedirs(run, exist_ok=True)
        # nginx's workers (nobody, when started as root) reach their temporary files in here.
        os.chmod(run, 0o711)
        instance = values["instance_dir"] or os.path.join(run, "instance")
        click.echo(
            render(
                plan,
                module=module,
                run_dir=run,
                instance_dir=os.path.abspath(instance),
                origin="appmanager nginx-config",
            ),
            nl=False,
        )

    return nginx_config


def run_engine(plan: Any) -> int:
    """``appmanager start --engine nginx``: serve the plan with nginx until a signal."""
    from appmanager.nginxengine import run_engine as run

    return run(plan)
