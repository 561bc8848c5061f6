"""Generating the nginx and Apache directive tables from the settings registry.

Both modules include ``integrations/appmanager_directives.def``, an X-macro table: each module
defines ``AM_SETTING`` and ``AM_DIRECTIVE`` to turn the rows into its own command tables, so the
directives, their types and their checks are written once, here, from ``settings.py``. Run
``python -m appmanager.docgen`` after changing a setting; a test fails when the committed table
differs from what this produces.
"""

from __future__ import annotations

from pathlib import Path

from appmanager.settings import SETTINGS, Setting

DEF_PATH = Path(__file__).resolve().parent.parent / "integrations" / "appmanager_directives.def"

_KINDS = {
    "str": "AM_STR",
    "path": "AM_PATH",
    "int": "AM_INT",
    "float": "AM_FLOAT",
    "bool": "AM_BOOL",
    "env": "AM_ENV",
    "list": "AM_LIST",
}
_ROLES = {"app": "AM_ROLE_APP", "core": "AM_ROLE_CORE", "module": "AM_ROLE_MODULE"}
# Validators the C side can repeat, by the validator's function name (settings.py).
_CHECKS = {
    "_nonempty": "AM_CHECK_NONEMPTY",
    "_base_uri": "AM_CHECK_URI_PATH",
    "_user": "AM_CHECK_USER",
    "_existing_user": "AM_CHECK_USER",
    "_group": "AM_CHECK_GROUP",
    "_readable_file": "AM_CHECK_READABLE_FILE",
    "_host_port": "AM_CHECK_HOST_PORT",
    "_urls": "AM_CHECK_URL",
    "_port": "AM_CHECK_PORT",
    "_writable_parent": "AM_CHECK_NONE",
}
# Words that Apache directives spell in capitals (Passenger's PassengerBaseURI).
_APACHE_WORDS = {"uri": "URI"}


def directive_settings() -> list[Setting]:
    """The settings that have a directive in the web-server modules, in registry order."""
    return [s for s in SETTINGS if s.connector_role != "none"]


def nginx_names(setting: Setting) -> list[str]:
    """``appmanager_<name>`` and ``passenger_<name>`` for the name and each alias."""
    names = (setting.name, *setting.aliases)
    return [f"{prefix}_{n}" for n in names for prefix in ("appmanager", "passenger")]


def apache_names(setting: Setting) -> list[str]:
    """``AppManager<Name>`` and ``Passenger<Name>`` for the name and each alias."""
    out = []
    for name in (setting.name, *setting.aliases):
        camel = "".join(_APACHE_WORDS.get(w, w.capitalize()) for w in name.split("_"))
        out += [f"AppManager{camel}", f"Passenger{camel}"]
    return out


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check(setting: Setting) -> str:
    if setting.validator is None:
        return "AM_CHECK_NONE"
    name = setting.validator.__name__
    if name == "check" and hasattr(setting.validator, "minimum"):
        return "AM_CHECK_MIN"
    return _CHECKS[name]


def _minimum(setting: Setting) -> str:
    minimum = getattr(setting.validator, "minimum", 0)
    return f"{float(minimum)!r}"


def render() -> str:
    """The whole text of ``integrations/appmanager_directives.def``."""
    lines = [
        "/* Generated from appmanager/settings.py by `python -m appmanager.docgen`; do not edit.",
        " *",
        " * AM_SETTING(id, name, kind, role, check, minimum, choices)",
        " *   one row per setting that has a directive; `name` is the key sent to the core",
        " *   (docs/protocol/connector.md), `choices` a '|'-separated list or NULL.",
        " * AM_DIRECTIVE(id, nginx_name, apache_name)",
        " *   one row per directive name: the appmanager name and the Passenger alias.",
        " */",
        "",
        "#ifdef AM_SETTING",
    ]
    settings = directive_settings()
    for s in settings:
        choices = _c_string("|".join(s.choices)) if s.choices else "NULL"
        lines.append(
            f"AM_SETTING(AM_S_{s.name.upper()}, {_c_string(s.name)}, {_KINDS[s.type]}, "
            f"{_ROLES[s.connector_role]}, {_check(s)}, {_minimum(s)}, {choices})"
        )
    lines += ["#endif", "", "#ifdef AM_DIRECTIVE"]
    for s in settings:
        for nginx, apache in zip(nginx_names(s), apache_names(s), strict=True):
            lines.append(
                f"AM_DIRECTIVE(AM_S_{s.name.upper()}, {_c_string(nginx)}, {_c_string(apache)})"
            )
    lines += ["#endif", ""]
    return "\n".join(lines)
