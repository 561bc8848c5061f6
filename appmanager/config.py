"""Turning the command line, ``appmanager.toml`` and ``Passengerfile.json`` into the apps to serve.

Precedence, lowest first: each setting's default, the config file's top level, the app's
``[[app]]`` table or ``Passengerfile.json``, then the options given on the command line. The result,
a ``Plan``, is built once at start and read by the core; it does not change while the core runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any

from appmanager import settings
from appmanager.detect import AppSpec, DetectError, detect

log = logging.getLogger("appmanager")

PASSENGERFILE = "Passengerfile.json"
# Passengerfile.json keys whose appmanager setting has another name.
PASSENGER_RENAMES = {"envvars": "env_var"}
# A Passengerfile.json belongs to the app's owner: it may not name files the core (perhaps root)
# would read on the app's behalf, nor the user the app runs as.
PASSENGERFILE_REFUSED = frozenset({"custom_error_page", "user", "group"})
APP_ONLY_KEYS = ("root",)


class ConfigError(Exception):
    """A config file or option that cannot be used; the message names the file, key and line."""


@dataclass(frozen=True)
class AppConfig:
    """One app to serve: where it is, how it is found by requests, and its settings."""

    name: str
    spec: AppSpec
    settings: dict[str, Any]
    server_names: tuple[str, ...]
    base_uri: str


@dataclass(frozen=True)
class Plan:
    """Everything the core needs to start: global settings and the apps."""

    settings: dict[str, Any]
    apps: tuple[AppConfig, ...]
    mass_deployment: bool = False
    # `appmanager core`: no app of its own and no TCP port; apps come from connectors.
    connector_only: bool = False


def build(app_dir: str | None, cli: dict[str, Any]) -> Plan:
    """The plan for ``appmanager start [APP_DIR]`` with the CLI options in ``cli`` (raw values,
    None where not given)."""
    given = {k: v for k, v in cli.items() if v is not None and v != ()}
    cli_values = {k: settings.BY_NAME[k].parse(v) for k, v in given.items()}
    config_path = cli_values.get("config")
    if config_path is not None:
        if app_dir is not None:
            raise ConfigError("give either an app directory or --config, not both")
        return _from_config_file(config_path, cli_values)
    root = os.path.abspath(app_dir or ".")
    passengerfile = _read_passengerfile(root)
    values = settings.defaults()
    values.update(passengerfile)
    values.update(cli_values)
    try:
        app = _app(root, values, server_names=(), base_uri=values["base_uri"])
    except DetectError as exc:
        apps = _mass_deployment(root, values, cli_values)
        if not apps:
            raise ConfigError(str(exc)) from None
        return Plan(values, tuple(apps), mass_deployment=True)
    return Plan(values, (app,))


def _app(
    root: str, values: dict[str, Any], server_names: tuple[str, ...], base_uri: str | None
) -> AppConfig:
    spec = detect(root, values["app_type"], values["startup_file"], values["app_start_command"])
    normalized = (base_uri or "").rstrip("/")
    name = os.path.basename(root.rstrip("/")) or "app"
    app_settings = dict(values)
    app_settings["env_var"] = dict(values["env_var"] or {})
    app_settings["base_uri"] = normalized
    return AppConfig(name, spec, app_settings, server_names, normalized)


def app_config(root: str, values: dict[str, Any]) -> AppConfig:
    """One app at ``root`` with the settings ``values`` (a connector's app: no server names).
    Raises DetectError when no app is found there."""
    return _app(root, values, server_names=(), base_uri=values["base_uri"])


def _mass_deployment(
    root: str, values: dict[str, Any], cli_values: dict[str, Any]
) -> list[AppConfig]:
    """Every subdirectory of ``root`` that holds an app, served at the Host of its name."""
    if not os.path.isdir(root):
        return []
    apps = []
    for entry in sorted(os.listdir(root)):
        sub = os.path.join(root, entry)
        if entry.startswith(".") or not os.path.isdir(sub):
            continue
        app_values = settings.defaults()
        app_values.update({k: v for k, v in values.items() if k in cli_values})
        app_values.update(_read_passengerfile(sub))
        app_values.update(cli_values)
        try:
            apps.append(_app(sub, app_values, (entry,), app_values["base_uri"]))
        except DetectError:
            continue
    return apps


def _read_passengerfile(root: str) -> dict[str, Any]:
    """The settings in ``root/Passengerfile.json``, parsed; Passenger-only keys are ignored with a
    warning, so that a Passenger user's file keeps working."""
    path = os.path.join(root, PASSENGERFILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    values: dict[str, Any] = {}
    for key, raw in data.items():
        name = PASSENGER_RENAMES.get(str(key), str(key))
        if name in PASSENGERFILE_REFUSED:
            log.warning(
                "%s: ignoring %r: only the command line or appmanager.toml may set it", path, key
            )
            continue
        setting = settings.BY_NAME.get(name)
        if setting is None or not setting.file:
            log.warning("%s: ignoring %r, which appmanager does not support", path, key)
            continue
        try:
            values[name] = setting.parse(raw)
        except settings.SettingError as exc:
            raise ConfigError(f"{path}: {key}: {exc.reason}") from None
    return values


def _from_config_file(path: str, cli_values: dict[str, Any]) -> Plan:
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            raw_bytes = f.read()
        data = tomllib.loads(raw_bytes.decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    text = raw_bytes.decode("utf-8")
    base_dir = os.path.dirname(path)
    top = {k: v for k, v in data.items() if k != "app"}
    values = settings.defaults()
    for key, raw in top.items():
        values[key] = _parse_key(path, text, key, raw, None, allow_global=True)
    tables = data.get("app", [])
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{path}: no [[app]] tables: nothing to serve")
    apps = []
    seen_roots = set()
    for index, table in enumerate(tables):
        if "root" not in table:
            line = _line_of(text, "[[app]]", index, header=True)
            raise ConfigError(f"{path}:{line}: [[app]] without root")
        root = os.path.normpath(os.path.join(base_dir, str(table["root"])))
        app_values = dict(values)
        app_values.update(_read_passengerfile(root))
        for key, raw in table.items():
            if key in APP_ONLY_KEYS:
                continue
            app_values[key] = _parse_key(path, text, key, raw, index, allow_global=False)
        app_values.update({k: v for k, v in cli_values.items() if k != "config"})
        server_names = tuple(app_values["server_names"] or ())
        try:
            app = _app(root, app_values, server_names, app_values["base_uri"])
        except DetectError as exc:
            line = _line_of(text, "root", index)
            raise ConfigError(f"{path}:{line}: {exc}") from None
        route = (server_names, app.base_uri)
        if route in seen_roots:
            line = _line_of(text, "root", index)
            raise ConfigError(
                f"{path}:{line}: two apps answer to the same server names and base_uri"
            )
        seen_roots.add(route)
        apps.append(app)
    values.update({k: v for k, v in cli_values.items() if k != "config"})
    values["config"] = path
    return Plan(values, tuple(apps))


def _parse_key(
    path: str, text: str, key: str, raw: Any, app_index: int | None, *, allow_global: bool
) -> Any:
    setting = settings.BY_NAME.get(key)
    where = f"{path}:{_line_of(text, key, app_index)}"
    if setting is None or not setting.file:
        raise ConfigError(f"{where}: unknown key {key!r}")
    if not allow_global and setting.scope is settings.Scope.GLOBAL:
        raise ConfigError(f"{where}: {key!r} is a global setting; put it before the [[app]] tables")
    try:
        return setting.parse(raw)
    except settings.SettingError as exc:
        raise ConfigError(f"{where}: {key}: {exc.reason}") from None


def _line_of(text: str, key: str, app_index: int | None, header: bool = False) -> int:
    """The line where ``key`` is set: at the top level (``app_index`` None) or in the
    ``app_index``-th ``[[app]]`` table. tomllib reports no positions, so this scans the text."""
    lines = text.splitlines()
    section = -1
    pattern = re.compile(r"^\s*(\"" + re.escape(key) + r"\"|" + re.escape(key) + r")\s*=")
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("[[app]]"):
            section += 1
            if header and section == app_index:
                return number
            continue
        wanted = -1 if app_index is None else app_index
        if section == wanted and pattern.match(line):
            return number
    return 0
