"""Finding the app in an app root: its type, startup file and the name of its callable.

Detection runs once per app when the core starts; its result, an ``AppSpec``, lives as long as the
Group of that app.
"""

from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass

# What `appmanager start` looks for, in order: (file, app type, callables). The error message lists
# the same names. Python files get the type "python": the shim tells WSGI from ASGI itself.
CANDIDATES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("passenger_wsgi.py", "python", ("application",)),
    ("config.ru", "rack", ()),
    ("wsgi.py", "python", ("application", "app")),
    ("asgi.py", "python", ("application", "app")),
    ("app.py", "python", ("application", "app")),
    ("main.py", "python", ("app", "application")),
    ("app.js", "node", ()),
    ("server.js", "node", ()),
)
PYTHON_TYPES = ("python", "wsgi", "asgi")
# What --app-type accepts, and which detected types each admits.
TYPE_FAMILY = {
    "wsgi": PYTHON_TYPES,
    "asgi": PYTHON_TYPES,
    "rack": ("rack",),
    "node": ("node",),
}


class DetectError(Exception):
    """No app could be found, or the one asked for does not exist; the message says what was
    looked for and where."""


@dataclass(frozen=True)
class AppSpec:
    """What the spawner needs to start an app: where it is and how to load it.

    ``app_type`` is ``python`` (WSGI or ASGI, the shim decides), ``wsgi``, ``asgi``, ``rack``,
    ``node`` or ``generic``; ``startup_file`` is empty for a generic app, which runs ``command``.
    """

    root: str
    app_type: str
    startup_file: str
    callables: tuple[str, ...] = ()
    command: str = ""

    @property
    def language(self) -> str:
        if self.app_type in PYTHON_TYPES:
            return "python"
        return {"rack": "ruby", "node": "node"}.get(self.app_type, "generic")


def detect(
    root: str,
    app_type: str | None = None,
    startup_file: str | None = None,
    command: str | None = None,
) -> AppSpec:
    """Find the app under ``root``; ``app_type``, ``startup_file`` and ``command`` override."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise DetectError(f"app root {root} is not a directory")
    if command or app_type == "generic":
        if not command:
            raise DetectError("app type generic needs --app-start-command")
        return AppSpec(root, "generic", "", (), command)
    if startup_file is not None:
        path = os.path.join(root, startup_file)
        if not os.path.isfile(path):
            raise DetectError(f"startup file {startup_file} not found in {root}")
        kind = app_type or _type_of_file(path)
        return AppSpec(root, kind, path, ("application", "app"))
    allowed = TYPE_FAMILY.get(app_type or "")
    for name, kind, callables in CANDIDATES:
        path = os.path.join(root, name)
        if os.path.isfile(path) and (allowed is None or kind in allowed):
            return AppSpec(root, app_type or kind, path, callables)
    if allowed is None or "node" in allowed:
        main = _package_json_main(root)
        if main is not None:
            return AppSpec(root, "node", main)
    if allowed is None or "python" in allowed:
        django = _detect_django(root)
        if django is not None:
            return AppSpec(root, app_type or "python", django[0], (django[1],))
    looked_for = ", ".join(name for name, _, _ in CANDIDATES)
    raise DetectError(
        f"no app found in {root}: looked for {looked_for}, package.json (main) and a Django "
        "project (manage.py)"
    )


def _type_of_file(path: str) -> str:
    if path.endswith(".ru"):
        return "rack"
    if path.endswith((".js", ".mjs", ".cjs")):
        return "node"
    return "python"


def _package_json_main(root: str) -> str | None:
    path = os.path.join(root, "package.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            main = json.load(f).get("main") or "index.js"
    except (ValueError, AttributeError) as exc:
        raise DetectError(f"{path} is not valid JSON: {exc}") from None
    candidate = os.path.join(root, str(main))
    for attempt in (candidate, candidate + ".js", os.path.join(candidate, "index.js")):
        if os.path.isfile(attempt):
            return attempt
    return None


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
