"""The nginx connector's commands: ``appmanager nginx-module build`` and ``nginx-config``, and
the entry point of ``appmanager start --engine nginx``.

The work is in ``nginxbuild`` (building the module), ``nginxconf`` (writing a configuration)
and ``nginxengine`` (running nginx in front of the core); this module only turns them into
commands, with what the Apache commands share from ``connectorcli``. ``nginx-config`` takes
the options of ``start``; ``cli.py`` hands it the decorator that makes them, so that they are
declared once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click

from appmanager import connectorcli
from appmanager.nginxbuild import MODULE_FILE, build_module

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

nginx_module = connectorcli.module_group(
    "nginx",
    about="appmanager's nginx module.",
    file_name=MODULE_FILE,
    build=build_module,
    load="load_module {path};",
    build_help="Build the module for the installed nginx (needs nginx-dev and a C compiler); "
    "prints the module's path as the last line.",
)


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
        from appmanager.nginxconf import render

        plan, module = connectorcli.plan_and_module(app_dir, raw, module_path, build_module)
        values = plan.settings
        # nginx's workers (nobody, when started as root) reach their temporary files in here.
        run = connectorcli.run_dir(run_dir, "nginx", values["port"], 0o711)
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
