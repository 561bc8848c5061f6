"""Writing an nginx configuration that serves apps through appmanager's module.

From a ``config.Plan`` (the apps and settings of ``appmanager start``'s options, an app's
``Passengerfile.json`` or an ``appmanager.toml``): one ``server`` block per set of server names,
in it one ``location`` per app (``/`` for the app without ``base_uri``, a regular expression for
each sub-URI app), whose root is the app's ``public/`` directory. App settings that differ from
their defaults become the app's directives; core settings go to the ``http`` block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from appmanager import connectorgen, settings

MIME_TYPES = "/etc/nginx/mime.types"


def quote(value: str) -> str:
    """A directive argument as nginx reads it: double-quoted, quotes and backslashes escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def regex(path: str) -> str:
    """``path`` as a literal in a regular expression."""
    return "".join(c if c.isalnum() or c in "/_~-" else "\\" + c for c in path)


def directive(name: str) -> str:
    """The ``appmanager_<name>`` directive of a setting."""
    return connectorgen.nginx_names(settings.BY_NAME[name])[0]


def directive_lines(values: dict[str, Any], role: str) -> list[str]:
    """Directives for the settings of ``role`` (``app`` or ``core``) whose values differ from
    their defaults, in the registry's order. The app root, base URI and instance directory
    have places of their own in the template."""
    lines = []
    for setting in connectorgen.directive_settings():
        if setting.connector_role != role or setting.name in (
            "app_root",
            "base_uri",
            "instance_dir",
        ):
            continue
        value = values.get(setting.name)
        if value is None or value == setting.default or value in ((), {}):
            continue
        name = directive(setting.name)
        if setting.type == "env":
            lines += [f"{name} {quote(k)} {quote(str(v))};" for k, v in value.items()]
        elif setting.type == "list":
            lines += [f"{name} {quote(str(v))};" for v in value]
        elif setting.type == "bool":
            lines.append(f"{name} {'on' if value else 'off'};")
        else:
            shown = str(int(value)) if isinstance(value, float) and value.is_integer() else value
            lines.append(f"{name} {quote(str(shown))};")
    return lines


@dataclass
class AppLocation:
    """One app in the configuration: where it is and its directives."""

    name: str
    root: str
    public: str
    base_uri: str
    directives: list[str]


@dataclass
class Server:
    """One ``server`` block: the apps that answer to one set of server names."""

    names: str
    apps: list[AppLocation] = field(default_factory=list)


@dataclass
class Ssl:
    """The certificate and key nginx serves HTTPS with."""

    certificate: str
    key: str


def render(
    plan: Any,
    *,
    module: str,
    run_dir: str,
    instance_dir: str,
    origin: str,
    error_log: str | None = None,
    log_level: str = "notice",
    user: str | None = None,
) -> str:
    """The nginx configuration for a ``config.Plan``, writing its files under ``run_dir``."""
    import jinja2

    values = plan.settings
    servers: dict[tuple[str, ...], Server] = {}
    for app in plan.apps:
        names = " ".join(app.server_names) if app.server_names else '""'
        server = servers.setdefault(app.server_names, Server(names))
        server.apps.append(
            AppLocation(
                app.name,
                app.spec.root,
                os.path.join(app.spec.root, "public"),
                app.base_uri,
                directive_lines(app.settings, "app"),
            )
        )
    # nginx answers a Host that no server names with the first server: the apps without
    # server names come first.
    ordered = sorted(servers.values(), key=lambda s: s.names != '""')
    ssl = None
    if values.get("ssl_certificate"):
        ssl = Ssl(
            os.path.abspath(values["ssl_certificate"]),
            os.path.abspath(values["ssl_certificate_key"]),
        )
    address = values["address"]
    host = f"[{address}]" if ":" in address else address
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("appmanager", "templates"),
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("nginx.conf.j2").render(
        origin=origin,
        module=quote(module),
        run_dir=run_dir,
        workers=2,
        error_log=error_log or quote(os.path.join(run_dir, "error.log")),
        log_level=log_level,
        user=user,
        mime_types=MIME_TYPES if os.path.isfile(MIME_TYPES) else None,
        instance_dir=instance_dir,
        core_directives=directive_lines(values, "core"),
        servers=ordered,
        listen=f"{host}:{values['port']}",
        ssl=ssl,
        quote=quote,
        regex=regex,
    )
