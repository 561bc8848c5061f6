"""What the nginx and Apache commands share: ``appmanager <server>-module build`` and the steps
of ``appmanager <server>-config`` that do not depend on the web server."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from appmanager import settings
from appmanager.connectorbuild import BuildError

Builder = Callable[..., Path]


def fail(message: str) -> NoReturn:
    """Print ``appmanager: message`` on standard error and exit with status 1."""
    click.echo(f"appmanager: {message}", err=True)
    sys.exit(1)


def module_group(
    server: str, about: str, file_name: str, build: Builder, load: str, build_help: str
) -> click.Group:
    """``appmanager <server>-module`` (``about`` is its help) with its ``build`` command: build
    with ``build(output, core_command)``, tell on standard error how to load the module
    (``load``, with ``{path}``), and print its path as the last line of standard output."""

    @click.group(f"{server}-module", help=about)
    def group() -> None:
        pass

    @group.command("build", help=build_help)
    @click.option(
        "--output",
        metavar="DIR",
        default=None,
        help=f"Put {file_name} in DIR (default: it stays in the build cache).",
    )
    @click.option(
        "--core-command",
        metavar="PATH",
        default=None,
        help="The appmanager executable the module starts by default (default: this one).",
    )
    def build_command(output: str | None, core_command: str | None) -> None:
        try:
            path = build(output, core_command)
        except BuildError as exc:
            fail(str(exc))
        click.echo(load.format(path=path), err=True)
        click.echo(str(path))

    return group


def plan_and_module(
    app_dir: str | None, raw: dict[str, Any], module_path: str | None, build: Builder
) -> tuple[Any, str]:
    """What a ``<server>-config`` command writes a configuration from: the ``config.Plan`` of
    its arguments, and the module (``module_path``, else built); exits naming what is wrong."""
    from appmanager import config

    try:
        plan = config.build(app_dir, raw)
    except (settings.SettingError, config.ConfigError) as exc:
        fail(str(exc))
    try:
        module = module_path or str(build())
    except BuildError as exc:
        fail(str(exc))
    return plan, module


def run_dir(given: str | None, server: str, port: Any, mode: int) -> str:
    """The absolute path of a printed configuration's run directory, made with ``mode``:
    ``given``, else one under the system's temporary directory named for the server and the
    port."""
    run = os.path.abspath(
        given or os.path.join(tempfile.gettempdir(), f"appmanager-{server}-{port}")
    )
    os.makedirs(run, exist_ok=True)
    os.chmod(run, mode)
    return run
