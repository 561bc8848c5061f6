"""What writing nginx and Apache configurations shares.

From a ``config.Plan``, both write one block per set of server names (an nginx ``server``, an
Apache ``<VirtualHost>``) with one section per app in it, turn the settings that differ from
their defaults into the module's directives, and render a jinja2 template of
``appmanager/templates``. How each web server spells a directive stays with it (``nginxconf``,
``apache``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from appmanager import connectorgen
from appmanager.settings import Setting


def quote(value: str) -> str:
    """A directive argument as nginx and Apache read it: double-quoted, with backslashes and
    quotes escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def shown(value: Any) -> str:
    """A setting's value as a directive argument: a whole number without ``.0``."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def changed_settings(
    values: dict[str, Any], role: str, skip: tuple[str, ...]
) -> Iterator[tuple[Setting, Any]]:
    """The settings of ``role`` (``app`` or ``core``) that have a directive and whose values
    differ from their defaults, with those values, in the registry's order; ``skip`` names the
    ones the template writes itself."""
    for setting in connectorgen.directive_settings():
        if setting.connector_role != role or setting.name in skip:
            continue
        value = values.get(setting.name)
        if value is None or value == setting.default or value in ((), {}):
            continue
        yield setting, value


@dataclass
class AppBlock:
    """One app in a configuration: where it is and its directives."""

    name: str
    root: str
    public: str
    base_uri: str
    directives: list[str]


@dataclass
class Host:
    """The apps that answer to one set of server names (none: every other name)."""

    server_names: tuple[str, ...]
    apps: list[AppBlock] = field(default_factory=list)

    @property
    def root_app(self) -> AppBlock | None:
        """The app at ``/``, if there is one."""
        return next((app for app in self.apps if not app.base_uri), None)

    @property
    def sub_apps(self) -> list[AppBlock]:
        """The apps under a base URI."""
        return [app for app in self.apps if app.base_uri]


H = TypeVar("H", bound=Host)


def group_hosts(
    plan: Any,
    directive_lines: Callable[[dict[str, Any], str], list[str]],
    host_type: type[H],
) -> list[H]:
    """The plan's apps grouped by their server names, each app with ``directive_lines`` of its
    app settings; the apps without server names first."""
    hosts: dict[tuple[str, ...], H] = {}
    for app in plan.apps:
        host = hosts.setdefault(app.server_names, host_type(app.server_names))
        host.apps.append(
            AppBlock(
                app.name,
                app.spec.root,
                os.path.join(app.spec.root, "public"),
                app.base_uri,
                directive_lines(app.settings, "app"),
            )
        )
    # Both web servers answer a Host that no block names with their first block.
    return sorted(hosts.values(), key=lambda h: len(h.server_names) > 0)


def render_template(name: str, **context: Any) -> str:
    """The template ``appmanager/templates/<name>`` rendered with ``context``."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("appmanager", "templates"),
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template(name).render(quote=quote, **context)
