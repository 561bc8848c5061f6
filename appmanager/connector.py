"""The core's side of the connector protocol: apps named by the nginx and Apache modules.

A module sends each request with ``!~App`` (the app root and its settings, one string per web
server location), ``!~Client`` (the client's addresses) and ``!~Secret`` (the core's connector
secret, which proves the request comes from the web server); see ``docs/protocol/connector.md``.
``ConnectorApps`` turns ``!~App`` strings into Groups of the Pool: it lives as long as the core,
creates a Group the first time a string is seen, and replaces the Group of the same
``(app_root, base_uri)`` when the string changes (the web server reloaded with new settings).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from appmanager import settings
from appmanager.config import app_config
from appmanager.detect import DetectError
from appmanager.group import Group

if TYPE_CHECKING:
    from appmanager.pool import Pool

log = logging.getLogger("appmanager")

# A string that could not become an app is answered from this cache for a while, so that a broken
# location costs no file-system work per request, yet a fix is noticed.
ERROR_RETRY = 5.0
SCHEMES = (b"http", b"https")


class ConnectorError(Exception):
    """An ``!~App`` the core cannot serve; the message names the setting or the app root."""


class ConnectorApps:
    """The Groups created for connectors, by ``!~App`` string and by ``(app_root, base_uri)``."""

    def __init__(self, pool: Pool, base: dict[str, Any]) -> None:
        self.pool = pool
        # The core's own settings: an app setting that a module leaves out takes its value here.
        self.base = base
        self._by_string: dict[bytes, Group] = {}
        self._by_identity: dict[tuple[str, str], Group] = {}
        self._errors: dict[bytes, tuple[float, str]] = {}

    def group_for(self, app: bytes) -> Group:
        """The Group serving the app ``app`` (an ``!~App`` value); raises ConnectorError."""
        group = self._by_string.get(app)
        if group is not None and not group.retired:
            return group
        failed = self._errors.get(app)
        if failed is not None and time.monotonic() < failed[0]:
            raise ConnectorError(failed[1])
        try:
            group = self._create(app)
        except ConnectorError as exc:
            self._errors[app] = (time.monotonic() + ERROR_RETRY, str(exc))
            log.error("connector app refused: %s", exc)
            raise
        self._errors.pop(app, None)
        return group

    def _create(self, app: bytes) -> Group:
        values = parse_app(app, self.base)
        root = values["app_root"]
        identity = (root, values["base_uri"] or "")
        try:
            config = app_config(root, values)
        except DetectError as exc:
            raise ConnectorError(f"app_root {root}: {exc}") from None
        except OSError as exc:
            raise ConnectorError(f"app_root {root}: {exc.strerror or exc}") from None
        try:
            group = Group(self.pool, config)
        except OSError as exc:  # e.g. an unreadable custom_error_page
            raise ConnectorError(f"app_root {root}: {exc.strerror or exc}") from None
        old = self._by_identity.get(identity)
        self.pool.add_group(group, routable=False)
        if old is not None:
            log.info("app %s: settings changed; new processes take its requests", group.name)
            old.retire(successor=group)
            for string, known in list(self._by_string.items()):
                if known is old:
                    del self._by_string[string]
        self._by_identity[identity] = group
        self._by_string[app] = group
        log.info("app %s at %s added for a connector", group.name, root)
        group.ensure_min_instances()
        return group


def parse_app(app: bytes, base: dict[str, Any]) -> dict[str, Any]:
    """The settings of an ``!~App`` value over ``base``, validated by the registry."""
    try:
        pairs = parse_qsl(app.decode("latin-1"), keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ConnectorError("malformed !~App field") from None
    values = dict(base)
    values["env_var"] = dict(base.get("env_var") or {})
    env: list[str] = []
    lists: dict[str, list[str]] = {}
    for name, raw in pairs:
        setting = settings.BY_NAME.get(name)
        if setting is None or setting.connector_role != "app":
            raise ConnectorError(f"{name}: not a setting a connector may send")
        if setting.type == "env":
            env.append(raw)
        elif setting.type == "list":
            lists.setdefault(name, []).append(raw)
        else:
            values[name] = _parse(setting, raw)
    if env:
        values["env_var"].update(_parse(settings.BY_NAME["env_var"], env))
    for name, items in lists.items():
        values[name] = _parse(settings.BY_NAME[name], items)
    root = values.get("app_root")
    if not root or not os.path.isabs(root):
        raise ConnectorError("app_root: missing or not an absolute path")
    values["app_root"] = os.path.normpath(root)
    return values


def _parse(setting: settings.Setting, raw: Any) -> Any:
    try:
        return setting.parse(raw)
    except settings.SettingError as exc:
        raise ConnectorError(f"{setting.name}: {exc.reason}") from None


def secret_path(socket_path: str) -> str:
    """Where the core keeps its connector secret: next to its socket."""
    return socket_path + ".secret"


def write_secret(socket_path: str) -> bytes:
    """Make a new connector secret and write it, readable by the core's user only, next to the
    socket; a web server's master process (root, or the core's user) reads it there."""
    secret = secrets.token_hex(16).encode()
    path = secret_path(socket_path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret + b"\n")
    return secret


def secret_matches(fields: dict[bytes, bytes], secret: bytes) -> bool:
    """Did the request carry the core's connector secret?"""
    given = fields.get(b"!~secret")
    return given is not None and bool(secret) and hmac.compare_digest(given.strip(), secret)


def client_meta(field: bytes) -> bytes | None:
    """The handoff's address fields from an ``!~Client`` value, or None when malformed."""
    parts = field.split()
    if len(parts) != 5 or parts[4] not in SCHEMES:
        return None
    if not parts[1].isdigit() or not parts[3].isdigit():
        return None
    return b" ".join(parts)
