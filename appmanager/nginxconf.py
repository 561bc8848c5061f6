"""Writing an nginx configuration that serves apps through appmanager's module.

From a ``config.Plan`` (the apps and settings of ``appmanager start``'s options, an app's
``Passengerfile.json`` or an ``appmanager.toml``): one ``server`` block per set of server names,
in it one ``location`` per app (``/`` for the app without ``base_uri``, a regular expression for
each sub-URI app), whose root is the app's ``public/`` directory. App settings that differ from
their defaults become the app's directives; core settings go to the ``http`` block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from appmanager import connectorgen, settings
from appmanager.connectorconf import (
    Host,
    changed_settings,
    group_hosts,
    quote,
    render_template,
    shown,
)

MIME_TYPES = "/etc/nginx/mime.types"


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
    for setting, value in changed_settings(values, role, ("app_root", "base_uri", "instance_dir")):
        name = directive(setting.name)
        if setting.type == "env":
            lines += [f"{name} {quote(k)} {quote(str(v))};" for k, v in value.items()]
        elif setting.type == "list":
            lines += [f"{name} {quote(str(v))};" for v in value]
        elif setting.type == "bool":
            lines.append(f"{name} {'on' if value else 'off'};")
        else:
            lines.append(f"{name} {quote(shown(value))};")
    return lines


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
    values = plan.settings
    ssl = None
    if values.get("ssl_certificate"):
        ssl = Ssl(
            os.path.abspath(values["ssl_certificate"]),
            os.path.abspath(values["ssl_certificate_key"]),
        )
    address = values["address"]
    host = f"[{address}]" if ":" in address else address
    return render_template(
        "nginx.conf.j2",
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
        servers=group_hosts(plan, directive_lines, Host),
        listen=f"{host}:{values['port']}",
        ssl=ssl,
        regex=regex,
    )
