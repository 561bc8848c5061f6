"""The ``appmanager`` command line. Every option of ``start`` comes from the settings registry."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click

from appmanager import __version__, settings
from appmanager.apache import apache_config, apache_module
from appmanager.nginx import nginx_config_command, nginx_module, run_engine


def _fail(message: str) -> None:
    click.echo(f"appmanager: {message}", err=True)
    sys.exit(1)


def _setting_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add one click option per CLI setting. Values stay raw strings here: the registry parses
    and validates them, so that an error names the option and says why in one place."""
    for setting in reversed(settings.SETTINGS):
        if not setting.cli:
            continue
        names = [setting.option]
        if setting.short:
            names.append(setting.short)
        default_text = "" if setting.default is None else f" [default: {_show(setting.default)}]"
        if setting.type in ("list", "env"):
            option = click.option(
                *names,
                setting.name,
                multiple=True,
                metavar=setting.metavar or "VALUE",
                help=setting.doc + " (repeatable)",
            )
        elif setting.type == "bool":
            # `--daemonize` alone means on; `--rolling-restarts off` takes a value.
            option = click.option(
                *names,
                setting.name,
                is_flag=False,
                flag_value="on",
                default=None,
                metavar="[on|off]",
                help=setting.doc + default_text,
            )
        else:
            option = click.option(
                *names,
                setting.name,
                default=None,
                metavar=setting.metavar or setting.type.upper(),
                help=setting.doc
                + (f" One of: {', '.join(setting.choices)}." if setting.choices else "")
                + default_text,
            )
        func = option(func)
    return func


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="appmanager")
def main() -> None:
    """appmanager: run Python web apps with managed, load-balanced processes."""


@main.command()
@click.argument("app_dir", required=False, default=None, type=click.Path(file_okay=False))
@_setting_options
def start(app_dir: str | None, **raw: Any) -> None:
    """Serve the app in APP_DIR (default: the current directory).

    APP_DIR may also hold several apps, one per subdirectory: each is served at the Host named
    after its directory (mass deployment). With --config, the apps come from an appmanager.toml.
    """
    from appmanager.config import ConfigError, build

    try:
        plan = build(app_dir, raw)
    except settings.SettingError as exc:
        _fail(str(exc))
    except ConfigError as exc:
        _fail(str(exc))
    from appmanager.core import Core

    values = plan.settings
    if values["engine"] == "nginx":
        sys.exit(run_engine(plan))
    if values["daemonize"] and not values["log_file"]:
        first = plan.apps[0].spec.root
        log_dir = os.path.join(first, "log")
        base = log_dir if os.path.isdir(log_dir) else first
        values["log_file"] = os.path.join(base, f"appmanager.{values['port']}.log")
    _serve(Core(plan))


def _serve(server: Any) -> None:
    """Open a Core's sockets, daemonize if asked, and run it until it stops; exits."""
    from appmanager.core import StartError, configure_logging

    values = server.settings
    try:
        server.open()
    except StartError as exc:
        _fail(str(exc))
    banner = sys.stdout
    if values["daemonize"]:
        banner = _daemonize()
    configure_logging(values)
    import uvloop

    from appmanager.pidfile import pid_file

    with pid_file(values["pid_file"]):
        status = uvloop.run(server.run(banner))
    sys.exit(status)


@main.command()
@_setting_options
@click.option(
    "--lifeline-fd",
    type=int,
    default=None,
    hidden=True,
    help="Stop when this descriptor reads EOF (a web server module passes a pipe).",
)
def core(lifeline_fd: int | None, **raw: Any) -> None:
    """Run a core for the nginx or Apache module: no app of its own, no TCP port; it serves
    the apps that requests on --socket name (docs/protocol/connector.md).

    The modules start one with the web server; run it yourself (e.g. under systemd) and point
    the module at it with appmanager_core_socket / AppManagerCoreSocket.
    """
    from appmanager.config import Plan
    from appmanager.core import Core

    given = {k: v for k, v in raw.items() if v is not None and v != ()}
    instance_dir, socket_path = given.get("instance_dir"), given.get("socket")
    # The socket usually lives in the instance directory, which the core creates: create it
    # first so that --socket's check (its directory exists) passes.
    if (
        instance_dir
        and socket_path
        and os.path.dirname(os.path.abspath(socket_path)) == os.path.abspath(instance_dir)
    ):
        os.makedirs(instance_dir, mode=0o711, exist_ok=True)
    try:
        values = settings.defaults()
        values.update({k: settings.BY_NAME[k].parse(v) for k, v in given.items()})
    except settings.SettingError as exc:
        _fail(str(exc))
    if not values["socket"]:
        _fail("--socket is required: the Unix socket the web server's module connects to")
    values["env_var"] = dict(values["env_var"] or {})
    _serve(Core(Plan(values, (), connector_only=True), lifeline_fd=lifeline_fd))


def _instance_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--instance-dir",
        "instance_dir",
        default=None,
        metavar="DIR",
        help="The instance directory of the core to talk to (default: the only running one).",
    )(func)


def _control(instance_dir: str | None, request: dict[str, Any], timeout: float) -> Any:
    from appmanager.controlclient import ControlError, call, find_instance

    try:
        instance = find_instance(instance_dir)
        return instance, call(instance, request, timeout)
    except ControlError as exc:
        _fail(str(exc))


@main.command()
@_instance_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON document.")
def status(instance_dir: str | None, as_json: bool) -> None:
    """Show a running appmanager's apps and processes."""
    import json

    from appmanager.statusview import render

    _, reply = _control(instance_dir, {"command": "status"}, 5.0)
    if as_json:
        click.echo(json.dumps(reply["status"], indent=2))
    else:
        click.echo(render(reply["status"]))


@main.command()
@_instance_option
@click.argument("app_root", required=False)
def restart(instance_dir: str | None, app_root: str | None) -> None:
    """Restart the app at APP_ROOT (every app when none is named), rolling: new processes are
    ready before old ones stop."""
    request: dict[str, Any] = {"command": "restart"}
    if app_root is not None:
        request["app"] = os.path.abspath(app_root)
    _, reply = _control(instance_dir, request, 120.0)
    for root in reply["restarted"]:
        click.echo(f"restarted {root}")


@main.command()
@_instance_option
@click.option("--timeout", type=float, default=None, help="Seconds in-flight requests get.")
def stop(instance_dir: str | None, timeout: float | None) -> None:
    """Stop a running appmanager gracefully and wait until it has exited."""
    import time

    instance, _ = _control(instance_dir, {"command": "stop", "timeout": timeout}, 5.0)
    deadline = time.monotonic() + (timeout if timeout is not None else 30.0) + 30.0
    import psutil

    while time.monotonic() < deadline:
        try:
            # A core whose parent has not reaped it yet is a zombie: it has stopped all the same.
            if psutil.Process(instance.pid).status() == psutil.STATUS_ZOMBIE:
                raise psutil.NoSuchProcess(instance.pid)
        except psutil.NoSuchProcess:
            click.echo(f"stopped appmanager (pid {instance.pid})")
            return
        time.sleep(0.1)
    _fail(f"appmanager (pid {instance.pid}) did not stop in time")


@main.command()
@_instance_option
@click.argument("pid", type=int)
def detach(instance_dir: str | None, pid: int) -> None:
    """Retire one app process: it finishes its requests and exits; a new one replaces it."""
    _control(instance_dir, {"command": "detach", "pid": pid}, 60.0)
    click.echo(f"detached process {pid}")


@main.command()
@_instance_option
@click.option("--interval", type=float, default=1.0, help="Seconds between refreshes.")
@click.option("--iterations", type=int, default=0, help="Stop after this many refreshes.")
def top(instance_dir: str | None, interval: float, iterations: int) -> None:
    """A live view of the processes, refreshed with the events the core publishes."""
    import collections
    import time

    from appmanager.controlclient import ControlError, call, events, find_instance
    from appmanager.statusview import render, render_event

    try:
        instance = find_instance(instance_dir)
    except ControlError as exc:
        _fail(str(exc))
    recent: collections.deque[str] = collections.deque(maxlen=10)
    stream = events(instance, 0.05)
    interactive = sys.stdout.isatty()
    count = 0
    try:
        while True:
            try:
                reply = call(instance, {"command": "status"}, 5.0)
            except ControlError as exc:
                _fail(str(exc))
            deadline = time.monotonic() + interval
            if interactive:
                click.echo("\x1b[H\x1b[2J", nl=False)
            click.echo(render(reply["status"]))
            click.echo("\nrecent events:" if recent else "\nno events yet")
            for line in recent:
                click.echo(f"  {line}")
            if not interactive:
                click.echo("")
            count += 1
            if iterations and count >= iterations:
                return
            while time.monotonic() < deadline:
                event = next(stream)
                if event is not None:
                    stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
                    recent.append(f"{stamp} {render_event(event)}")
    except KeyboardInterrupt:
        return
    finally:
        stream.close()


def _daemonize() -> Any:
    """Detach (double fork, new session). The original process waits until the daemon prints its
    banner, echoes it and exits, so that a failure to start still reaches the terminal."""
    read_fd, write_fd = os.pipe()
    if os.fork() > 0:
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            text = pipe.read()
        sys.stdout.write(text)
        sys.exit(0 if "Serving" in text else 1)
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return _ClosingWriter(write_fd)


class _ClosingWriter:
    """The banner's way back to the terminal from the daemon: closed after the first flush."""

    def __init__(self, fd: int) -> None:
        self._file = os.fdopen(fd, "w")

    def write(self, text: str) -> int:
        return self._file.write(text)

    def flush(self) -> None:
        self._file.flush()
        self._file.close()


# Commands of the web-server connectors register below, one line each.
main.add_command(apache_module)
main.add_command(apache_config)
main.add_command(nginx_module)
main.add_command(nginx_config_command(_setting_options))
