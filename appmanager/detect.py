"""Finding the app in an app root: its type, startup file and the name of its callable.

Detection runs once per app when the core starts; its result, an ``AppSpec``, lives as long as the
Group of that app.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass

# What `appmanager start` looks for, in order; the error message lists the same names.
WSGI_CANDIDATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("passenger_wsgi.py", ("application",)),
    ("wsgi.py", ("application", "app")),
    ("app.py", ("application", "app")),
)


class DetectError(Exception):
    """No app could be found, or the one asked for does not exist; the message says what was
    looked for and where."""


@dataclass(frozen=True)
class AppSpec:
    """What the spawner needs to start an app: where it is and how to load it."""

    root: str
    app_type: str
    startup_file: str
    callables: tuple[str, ...]


def detect(root: str, app_type: str | None = None, startup_file: str | None = None) -> AppSpec:
    """Find the app under ``root``; ``app_type`` and ``startup_file`` override detection."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise DetectError(f"app root {root} is not a directory")
    if startup_file is not None:
        path = os.path.join(root, startup_file)
        if not os.path.isfile(path):
            raise DetectError(f"startup file {startup_file} not found in {root}")
        return AppSpec(root, app_type or "wsgi", path, ("application", "app"))
    for name, callables in WSGI_CANDIDATES:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return AppSpec(root, app_type or "wsgi", path, callables)
    django = _detect_django(root)
    if django is not None:
        return AppSpec(root, app_type or "wsgi", django[0], (django[1],))
    looked_for = ", ".join(name for name, _ in WSGI_CANDIDATES)
    raise DetectError(
        f"no app found in {root}: looked for {looked_for} and a Django project (manage.py)"
    )


def _detect_django(root: str) -> tuple[str, str] | None:
    """Return (wsgi file, callable) of the Django project whose manage.py is in ``root``."""
    manage = os.path.join(root, "manage.py")
    if not os.path.isfile(manage):
        return None
    with open(manage, encoding="utf-8", errors="replace") as f:
        text = f.read()
    match = re.search(r"""DJANGO_SETTINGS_MODULE['"]\s*,\s*['"]([\w.]+)['"]""", text)
    if match is None:
        raise DetectError(f"{manage} does not set DJANGO_SETTINGS_MODULE")
    settings_module = match.group(1)
    settings_path = _module_path(root, settings_module)
    if settings_path is None:
        raise DetectError(f"Django settings module {settings_module} not found in {root}")
    wsgi_app = _wsgi_application(settings_path)
    if wsgi_app is None:
        # Django's own default layout when WSGI_APPLICATION is not set.
        wsgi_app = settings_module.rsplit(".", 1)[0] + ".wsgi.application"
    module, _, attr = wsgi_app.rpartition(".")
    wsgi_path = _module_path(root, module)
    if wsgi_path is None:
        raise DetectError(f"Django WSGI module {module} (from {settings_module}) not found")
    return wsgi_path, attr


def _module_path(root: str, dotted: str) -> str | None:
    base = os.path.join(root, *dotted.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _wsgi_application(settings_path: str) -> str | None:
    """Read ``WSGI_APPLICATION`` from a settings file without importing it."""
    with open(settings_path, encoding="utf-8", errors="replace") as f:
        try:
            tree = ast.parse(f.read(), settings_path)
        except SyntaxError:
            return None
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "WSGI_APPLICATION" for t in node.targets)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            return node.value.value
    return None
