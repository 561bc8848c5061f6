"""The one declaration of every appmanager setting.

Each setting is declared once here, as a frozen dataclass in ``SETTINGS``. The CLI options, the
validation of values, and ``docs/settings.md`` are all derived from this list; later the config
files and the nginx and Apache directive tables come from it too. Nothing else in the code base
spells a setting's default, type or documentation.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Scope(Enum):
    """Where a setting applies: to the whole core, or to one app."""

    GLOBAL = "global"
    APP = "app"


class SettingError(ValueError):
    """A setting's value was rejected; the message names the setting and says why."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"invalid value for {setting}: {reason}")
        self.setting = setting
        self.reason = reason


Validator = Callable[[Any], None]


def _at_least(minimum: int) -> Validator:
    def check(value: Any) -> None:
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")

    # The connectors' generated tables check the same bound in C (connectorgen.py).
    check.minimum = minimum  # type: ignore[attr-defined]
    return check


def _port(value: Any) -> None:
    if not 0 < value < 65536:
        raise ValueError(f"must be between 1 and 65535, got {value}")


def _writable_parent(value: Any) -> None:
    parent = os.path.dirname(os.path.abspath(value)) or "."
    if not os.path.isdir(parent):
        raise ValueError(f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"directory {parent} is not writable")


def _readable_file(value: Any) -> None:
    if not os.path.isfile(value):
        raise ValueError(f"file {value} does not exist")
    if not os.access(value, os.R_OK):
        raise ValueError(f"file {value} is not readable")


def _nonempty(value: Any) -> None:
    if not str(value).strip():
        raise ValueError("must not be empty")


def _user(value: Any) -> None:
    try:
        uid = pwd.getpwnam(value).pw_uid
    except KeyError:
        raise ValueError(f"user {value!r} does not exist") from None
    if os.geteuid() != 0:
        if uid != os.geteuid():
            raise ValueError("--user needs appmanager to run as root")
    elif uid == 0:
        raise ValueError("apps never run as root (a root-owned app runs as nobody)")


def _group(value: Any) -> None:
    try:
        gid = grp.getgrnam(value).gr_gid
    except KeyError:
        raise ValueError(f"group {value!r} does not exist") from None
    if os.geteuid() != 0:
        if gid != os.getegid():
            raise ValueError("--group needs appmanager to run as root")
    elif gid == 0:
        raise ValueError("apps never run as group root")


@dataclass(frozen=True)
class Setting:
    """One setting: its name, type, default, scope, documentation and validator.

    ``name`` is the canonical snake_case name (``max_pool_size``); the CLI option is
    ``--max-pool-size``. ``type`` is one of ``str``, ``int``, ``float``, ``bool`` or ``path``.
    ``choices`` restricts a ``str`` setting. ``cli`` is False for settings that only a config file
    or connector may give; ``file`` is False for settings no config file may give.

    ``connector`` says what the nginx and Apache modules do with it (``connector_role``):
    ``app`` — a per-location directive whose value travels with each request
    (``docs/protocol/connector.md``); ``core`` — a server-wide directive passed to the core the
    module starts, as its command-line option; ``module`` — a directive the module itself acts on,
    never sent; ``none`` — no directive. Left unset: ``app`` for app settings, ``none`` for global
    ones. ``aliases`` are further names of the same setting (a Passenger directive's name).
    """

    name: str
    type: str
    default: Any
    scope: Scope
    doc: str
    validator: Validator | None = None
    choices: tuple[str, ...] = ()
    short: str | None = None
    cli: bool = True
    metavar: str | None = None
    file: bool = True
    aliases: tuple[str, ...] = field(default=())
    connector: str | None = None

    @property
    def connector_role(self) -> str:
        """``app``, ``core``, ``module`` or ``none``: see the class docstring."""
        if self.connector is not None:
            return self.connector
        return "app" if self.scope is Scope.APP else "none"

    @property
    def option(self) -> str:
        """The long CLI option, e.g. ``--max-pool-size``."""
        return "--" + self.name.replace("_", "-")

    def parse(self, raw: Any) -> Any:
        """Turn a raw value (a CLI or config string, or an already typed value) into the setting's
        type, validated. Raises ``SettingError`` naming the setting."""
        if raw is None:
            return None
        try:
            value = _convert(self.type, raw)
            if self.choices and value not in self.choices:
                raise ValueError(f"must be one of {', '.join(self.choices)}, got {value!r}")
            if self.validator is not None:
                self.validator(value)
        except ValueError as exc:
            raise SettingError(self.option, str(exc)) from None
        return value


def _convert(kind: str, raw: Any) -> Any:
    if kind == "int":
        if isinstance(raw, bool):
            raise ValueError(f"must be an integer, got {raw!r}")
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw).strip())
        except ValueError:
            raise ValueError(f"must be an integer, got {raw!r}") from None
    if kind == "float":
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number, got {raw!r}") from None
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"must be on or off, got {raw!r}")
    if kind in ("str", "path"):
        if not isinstance(raw, str | int | float):
            raise ValueError(f"must be a string, got {raw!r}")
        return str(raw)
    if kind == "list":
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"must be a list of strings, got {raw!r}")
        return tuple(items)
    if kind == "env":
        return _env_pairs(raw)
    raise ValueError(f"unknown setting type {kind}")


def _env_pairs(raw: Any) -> dict[str, str]:
    """``NAME=VALUE`` strings (CLI, lists) or a table (config files) as one dict."""
    if isinstance(raw, dict):
        pairs = list(raw.items())
    else:
        items = [raw] if isinstance(raw, str) else list(raw)
        pairs = []
        for item in items:
            name, sep, value = str(item).partition("=")
            if not sep:
                raise ValueError(f"expected NAME=VALUE, got {item!r}")
            pairs.append((name, value))
    env: dict[str, str] = {}
    for name, value in pairs:
        if not name or "=" in name or "\0" in name or not isinstance(value, str | int | float):
            raise ValueError(f"invalid environment variable {name!r}")
        env[str(name)] = str(value)
    return env


def _existing_user(value: Any) -> None:
    try:
        pwd.getpwnam(value)
    except KeyError:
        raise ValueError(f"user {value!r} does not exist") from None


def _urls(value: Any) -> None:
    for url in value:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, got {url!r}")


def _host_port(value: Any) -> None:
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be HOST:PORT, got {value!r}")


def _base_uri(value: Any) -> None:
    if not value.startswith("/") or "?" in value or "#" in value:
        raise ValueError(f"must be a path starting with /, got {value!r}")


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "address",
        "str",
        "127.0.0.1",
        Scope.GLOBAL,
        "The address the core listens on for HTTP.",
        validator=_nonempty,
        metavar="HOST",
    ),
    Setting(
        "port",
        "int",
        3000,
        Scope.GLOBAL,
        "The TCP port the core listens on for HTTP.",
        validator=_port,
        short="-p",
    ),
    Setting(
        "socket",
        "path",
        None,
        Scope.GLOBAL,
        "Also listen for HTTP on this Unix socket (what the nginx and Apache connectors use).",
        validator=_writable_parent,
        metavar="PATH",
    ),
    Setting(
        "environment",
        "str",
        "production",
        Scope.APP,
        "The app's environment; sets RACK_ENV, RAILS_ENV, NODE_ENV, WSGI_ENV and APPMANAGER_ENV. "
        "`development` shows error details in the browser.",
        validator=_nonempty,
        short="-e",
        metavar="NAME",
        aliases=("app_env",),
    ),
    Setting(
        "app_type",
        "str",
        None,
        Scope.APP,
        "The kind of app, instead of detecting it: `wsgi` or `asgi` (Python), `rack` (Ruby), "
        "`node`, or `generic` (any program that listens on $PORT; see app_start_command).",
        choices=("wsgi", "asgi", "rack", "node", "generic"),
    ),
    Setting(
        "startup_file",
        "path",
        None,
        Scope.APP,
        "The file that defines the app, relative to the app root, instead of detecting it.",
        metavar="FILE",
    ),
    Setting(
        "python",
        "path",
        None,
        Scope.APP,
        "The Python interpreter that runs the app (default: the one running appmanager).",
        metavar="PATH",
    ),
    Setting(
        "ruby",
        "path",
        None,
        Scope.APP,
        "The Ruby interpreter that runs Rack apps (default: ruby on the PATH).",
        metavar="PATH",
    ),
    Setting(
        "nodejs",
        "path",
        None,
        Scope.APP,
        "The Node.js interpreter that runs Node apps (default: node on the PATH).",
        metavar="PATH",
    ),
    Setting(
        "app_start_command",
        "str",
        None,
        Scope.APP,
        "Run the app with this shell command instead of a spawner shim: a generic app that "
        "listens on the port given in $PORT (on 127.0.0.1). The core proxies requests to it.",
        validator=_nonempty,
        metavar="COMMAND",
    ),
    Setting(
        "user",
        "str",
        None,
        Scope.APP,
        "When appmanager runs as root: run the app's processes as this user instead of the owner "
        "of the app's startup file (of the app root, for a generic app). An app never runs as "
        "root: when that owner is root, its processes run as `nobody`. The processes get the "
        "user's groups and its HOME, USER and LOGNAME. Without root, the processes run as "
        "appmanager's own user. Command line only: a Passengerfile.json belongs to the app's "
        "owner, who must not choose whom the app runs as.",
        validator=_user,
        metavar="NAME",
        file=False,
    ),
    Setting(
        "group",
        "str",
        None,
        Scope.APP,
        "When appmanager runs as root: run the app's processes with this primary group instead "
        "of their user's (`nogroup` for a user whose group is root). Command line only.",
        validator=_group,
        metavar="NAME",
        file=False,
    ),
    Setting(
        "env_var",
        "env",
        None,
        Scope.APP,
        "Set an environment variable for the app, as NAME=VALUE; repeat for more. In a config "
        'file, a table: `env_var = { NAME = "VALUE" }`.',
        metavar="NAME=VALUE",
    ),
    Setting(
        "base_uri",
        "str",
        None,
        Scope.APP,
        "Serve the app under this path prefix. Python apps see it as SCRIPT_NAME, Rack apps as "
        "SCRIPT_NAME (Rails uses it as the relative URL root); Node apps see request URLs with "
        "the prefix stripped.",
        validator=_base_uri,
        metavar="PATH",
    ),
    Setting(
        "server_names",
        "list",
        None,
        Scope.APP,
        "Host names the app answers to (matched against the Host header, without the port); "
        "config files only.",
        cli=False,
        connector="none",
    ),
    Setting(
        "app_root",
        "path",
        None,
        Scope.APP,
        "The app's directory, for the nginx and Apache modules (`appmanager start` takes it as "
        "its argument). Default, as in Passenger: the parent of the server block's `root` or the "
        "virtual host's `DocumentRoot`.",
        metavar="DIR",
        cli=False,
        file=False,
    ),
    Setting(
        "enabled",
        "bool",
        False,
        Scope.APP,
        "nginx and Apache: hand this server block's, location's or virtual host's requests to "
        "appmanager (files that exist under the document root are still served by the web "
        "server).",
        cli=False,
        file=False,
        connector="module",
    ),
    Setting(
        "core_socket",
        "path",
        None,
        Scope.GLOBAL,
        "nginx and Apache: send requests to the core already listening on this Unix socket "
        "(started on its own, e.g. by systemd, with `appmanager core --socket PATH`) instead of "
        "starting a core with the web server.",
        metavar="PATH",
        cli=False,
        file=False,
        connector="module",
    ),
    Setting(
        "core_command",
        "path",
        None,
        Scope.GLOBAL,
        "nginx and Apache: the `appmanager` executable that starts the core with the web server "
        "(default: the one that built the module).",
        metavar="PATH",
        cli=False,
        file=False,
        connector="module",
    ),
    Setting(
        "connector_user",
        "str",
        None,
        Scope.GLOBAL,
        "Besides the core's own user and root, the one user allowed to connect to --socket: the "
        "web server's worker user. The nginx and Apache modules pass it to the core they start. "
        "Connections from any other user are closed at once.",
        validator=_existing_user,
        metavar="NAME",
    ),
    Setting(
        "pre_start",
        "list",
        None,
        Scope.GLOBAL,
        "Request this URL once the core is ready, so that the app behind it has its processes "
        "running before the first visitor comes (like Passenger's pre_start); repeatable.",
        validator=_urls,
        metavar="URL",
        connector="core",
    ),
    Setting(
        "request_buffering",
        "bool",
        True,
        Scope.APP,
        "nginx: read a request's whole body before passing the request on (on), or stream a "
        "body of known length to the core as it arrives (off). The core still reads the whole "
        "body before an app process gets the request, so a slow upload never holds a process.",
        cli=False,
        file=False,
        connector="module",
    ),
    Setting(
        "engine",
        "str",
        "builtin",
        Scope.GLOBAL,
        "`builtin`: the core serves HTTP itself; `nginx`: run nginx with appmanager's module in "
        "front of the core (static files from public/, TLS), as Passenger Standalone's nginx "
        "engine does.",
        choices=("builtin", "nginx"),
        file=False,
    ),
    Setting(
        "ssl_certificate",
        "path",
        None,
        Scope.GLOBAL,
        "With --engine nginx: serve HTTPS with this certificate (PEM) instead of HTTP.",
        validator=_readable_file,
        metavar="FILE",
        file=False,
    ),
    Setting(
        "ssl_certificate_key",
        "path",
        None,
        Scope.GLOBAL,
        "With --engine nginx: the private key (PEM) of --ssl-certificate.",
        validator=_readable_file,
        metavar="FILE",
        file=False,
    ),
    Setting(
        "config",
        "path",
        None,
        Scope.GLOBAL,
        "Read apps and settings from this appmanager.toml file.",
        metavar="FILE",
        file=False,
    ),
    Setting(
        "restart_dir",
        "path",
        "tmp",
        Scope.APP,
        "Where to look for restart.txt (touch it to restart the app, rolling) and "
        "always_restart.txt (restart before every request); relative to the app root.",
        metavar="DIR",
    ),
    Setting(
        "rolling_restarts",
        "bool",
        True,
        Scope.APP,
        "Restart by starting new processes before stopping old ones, so that no request waits. "
        "Off: stop the old processes first; requests wait (none fail) until new ones are ready.",
    ),
    Setting(
        "friendly_error_pages",
        "bool",
        None,
        Scope.APP,
        "Show the failed step, the error and the app's output in the browser when the app "
        "cannot boot (default: on in development, off otherwise).",
    ),
    Setting(
        "custom_error_page",
        "path",
        None,
        Scope.APP,
        "An HTML file served, with status 500, instead of the built-in page when the app "
        "cannot boot.",
        validator=_readable_file,
        metavar="FILE",
    ),
    Setting(
        "user_switching",
        "bool",
        True,
        Scope.APP,
        "When the core runs as root, run each app as the owner of its startup file (never as "
        "root: nobody when root owns it). Off: apps run as the core's own user, which is only "
        "meant for development and tests.",
    ),
    Setting(
        "min_instances",
        "int",
        1,
        Scope.APP,
        "Processes of the app kept running even when idle; started before the server reports "
        "ready.",
        validator=_at_least(0),
        metavar="N",
    ),
    Setting(
        "max_instances_per_app",
        "int",
        0,
        Scope.APP,
        "The most processes of this app; 0 means only max_pool_size limits it.",
        validator=_at_least(0),
        metavar="N",
    ),
    Setting(
        "spawn_method",
        "str",
        None,
        Scope.APP,
        "`smart`: load the app once in a preloader and fork its processes from it (copy-on-write; "
        "Python and Ruby); `direct`: start every process from scratch. Default: smart for Python "
        "and Ruby, direct for Node and generic apps.",
        choices=("smart", "direct"),
    ),
    Setting(
        "max_preloader_idle_time",
        "float",
        300.0,
        Scope.APP,
        "Seconds a preloader may go without forking before it is stopped; it comes back when a "
        "process is needed. 0 keeps it forever.",
        validator=_at_least(0),
        metavar="SECONDS",
    ),
    Setting(
        "pool_idle_time",
        "float",
        300.0,
        Scope.APP,
        "Seconds a process may sit idle before it is stopped (never below min_instances). 0 keeps "
        "idle processes.",
        validator=_at_least(0),
        metavar="SECONDS",
    ),
    Setting(
        "max_requests",
        "int",
        0,
        Scope.APP,
        "Retire a process after it has served about this many requests (each process gets a "
        "limit up to 10% higher, so that they do not all restart together). 0 means no limit.",
        validator=_at_least(0),
        metavar="N",
    ),
    Setting(
        "memory_limit",
        "int",
        0,
        Scope.APP,
        "Retire a process, after its current request, once its private memory (USS) exceeds "
        "this many MB. 0 means no limit.",
        validator=_at_least(0),
        metavar="MB",
    ),
    Setting(
        "max_request_time",
        "float",
        0.0,
        Scope.APP,
        "Kill a process that has spent longer than this many seconds on one request; the "
        "client gets 504 and a fresh process takes its place. 0 means no limit.",
        validator=_at_least(0),
        metavar="SECONDS",
    ),
    Setting(
        "max_pool_size",
        "int",
        6,
        Scope.GLOBAL,
        "The most app processes the core runs at once, all apps together.",
        validator=_at_least(1),
        metavar="N",
        connector="core",
    ),
    Setting(
        "max_request_queue_size",
        "int",
        100,
        Scope.APP,
        "Requests that may wait for a process of the app; more are answered 503 at once. "
        "0 means no limit.",
        validator=_at_least(0),
        metavar="N",
    ),
    Setting(
        "start_timeout",
        "float",
        90.0,
        Scope.APP,
        "Seconds a process may take to boot before the spawn is abandoned and reported.",
        validator=_at_least(1),
        metavar="SECONDS",
    ),
    Setting(
        "shutdown_timeout",
        "float",
        30.0,
        Scope.GLOBAL,
        "Seconds in-flight requests get to finish when the core stops.",
        validator=_at_least(0),
        metavar="SECONDS",
        connector="core",
    ),
    Setting(
        "instance_dir",
        "path",
        None,
        Scope.GLOBAL,
        "Where the instance keeps its sockets and state; a private temporary directory by default. "
        "Removed when the core stops.",
        validator=_writable_parent,
        metavar="DIR",
        connector="core",
    ),
    Setting(
        "log_file",
        "path",
        None,
        Scope.GLOBAL,
        "Where the core writes its log and the apps' output (default: standard error; with "
        "--daemonize, log/appmanager.PORT.log in the app root).",
        validator=_writable_parent,
        metavar="FILE",
        connector="core",
    ),
    Setting(
        "metrics_address",
        "str",
        None,
        Scope.GLOBAL,
        "Serve /metrics (Prometheus text format) and /healthz (200 when ready, 503 while "
        "starting or stopping) on this HOST:PORT.",
        validator=_host_port,
        metavar="HOST:PORT",
        connector="core",
    ),
    Setting(
        "access_log",
        "path",
        None,
        Scope.GLOBAL,
        "Write one line per request to this file, in the combined log format (off by default).",
        validator=_writable_parent,
        metavar="FILE",
        connector="core",
    ),
    Setting(
        "log_level",
        "str",
        "info",
        Scope.GLOBAL,
        "The least severe level the core logs.",
        choices=("debug", "info", "warning", "error"),
        connector="core",
    ),
    Setting(
        "pid_file",
        "path",
        None,
        Scope.GLOBAL,
        "Write the core's pid to this file while it runs.",
        validator=_writable_parent,
        metavar="FILE",
    ),
    Setting(
        "daemonize",
        "bool",
        False,
        Scope.GLOBAL,
        "Detach from the terminal and run in the background.",
    ),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def defaults() -> dict[str, Any]:
    """Every setting's default value, by name."""
    return {s.name: s.default for s in SETTINGS}


def parse_all(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate a mapping of raw values by setting name, filling in defaults.

    Raises ``SettingError`` for the first bad value, and for a name that is not a setting.
    """
    values = defaults()
    for name, value in raw.items():
        setting = BY_NAME.get(name)
        if setting is None:
            raise SettingError(name, "no such setting")
        if value is not None:
            values[name] = setting.parse(value)
    return values
