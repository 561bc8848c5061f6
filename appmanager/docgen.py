"""Generating ``docs/settings.md`` from the settings registry.

Run ``python -m appmanager.docgen`` after changing ``settings.py``: it also writes the connectors'
directive table (``connectorgen.py``). A test fails when a committed file differs from what this
produces.
"""

from __future__ import annotations

import sys
from pathlib import Path

from appmanager import connectorgen
from appmanager.settings import SETTINGS, Setting

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "settings.md"


def _default(setting: Setting) -> str:
    if setting.default is None:
        return "(none)"
    if isinstance(setting.default, bool):
        return "off" if not setting.default else "on"
    if isinstance(setting.default, float) and setting.default.is_integer():
        return str(int(setting.default))
    return str(setting.default)


_ROLE_TEXT = {
    "app": "http, server or location; sent to the core with each request",
    "core": "http level; passed to the core the module starts",
    "module": "acted on by the module itself",
}


def render() -> str:
    """The whole text of docs/settings.md."""
    lines = [
        "# Settings",
        "",
        "<!-- Generated from appmanager/settings.py by `python -m appmanager.docgen`;"
        " do not edit. -->",
        "",
        "Every setting is declared once, in `appmanager/settings.py`. A bad value is rejected when",
        "appmanager starts, with the option's name and the reason. Settings with an nginx or",
        "Apache directive list its names: each also has its Passenger name (`passenger_...`,",
        "`Passenger...`), so that a Passenger configuration works unchanged; a bad value fails",
        "`nginx -t` or `apache2 -t` naming the directive.",
        "",
        "| setting | option | type | default | scope |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in SETTINGS:
        option = f"`{s.option}`" + (f", `{s.short}`" if s.short else "") if s.cli else "-"
        kind = s.type + (f" ({' / '.join(s.choices)})" if s.choices else "")
        lines.append(
            f"| [{s.name}](#{s.name}) | {option} | {kind} | `{_default(s)}` | {s.scope.value} |"
        )
    lines.append("")
    for s in SETTINGS:
        lines += [f"## {s.name}", "", s.doc, ""]
        if s.cli:
            lines.append(f"- option: `{s.option}`" + (f" (`{s.short}`)" if s.short else ""))
        else:
            lines.append(
                "- option: none (" + ("config files" if s.file else "connectors") + " only)"
            )
        lines.append(f"- default: `{_default(s)}`")
        if s.choices:
            lines.append(f"- one of: {', '.join(f'`{c}`' for c in s.choices)}")
        lines.append(f"- scope: {s.scope.value}")
        role = s.connector_role
        if role != "none":
            nginx = ", ".join(f"`{n}`" for n in connectorgen.nginx_names(s))
            apache = ", ".join(f"`{n}`" for n in connectorgen.apache_names(s))
            lines.append(f"- nginx: {nginx} ({_ROLE_TEXT[role]})")
            lines.append(f"- Apache: {apache}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    DOC_PATH.write_text(render())
    sys.stdout.write(f"wrote {DOC_PATH}\n")
    connectorgen.DEF_PATH.parent.mkdir(exist_ok=True)
    connectorgen.DEF_PATH.write_text(connectorgen.render())
    sys.stdout.write(f"wrote {connectorgen.DEF_PATH}\n")


if __name__ == "__main__":
    main()
