"""Rendering a core's status (the control protocol's STATUS) as the table operators read."""

from __future__ import annotations

from typing import Any

COLUMNS = (
    ("PID", 8),
    ("STATE", 9),
    ("SESSIONS", 9),
    ("PROCESSED", 10),
    ("UPTIME", 8),
    ("CPU%", 6),
    ("RSS", 8),
    ("PSS", 8),
    ("USS", 8),
    ("LAST USED", 9),
)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def size(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / (1024 * 1024):.1f}M"


def render(status: dict[str, Any]) -> str:
    lines = [
        f"appmanager {status['version']}  pid {status['pid']}  up {duration(status['uptime'])}"
        f"  {status['url']}",
        f"pool: {status['process_count']} of {status['max_pool_size']} processes, "
        f"{status['requests_queued']} requests queued",
    ]
    for app in status["apps"]:
        lines.append("")
        where = app["root"]
        if app["server_names"]:
            where += f"  ({', '.join(app['server_names'])})"
        if app["base_uri"]:
            where += f"  at {app['base_uri']}"
        lines.append(
            f"app {app['name']}  {where}  {app['type']}  {app['environment']}  "
            f"queue {app['queue']}"
            + (f"  spawning {app['spawning']}" if app["spawning"] else "")
            + (f"  preloader {app['preloader']['pid']}" if app["preloader"] else "")
        )
        if app["boot_error"]:
            error = app["boot_error"]
            lines.append(f"  failed to start: {error['step']} failed: {error['message']}")
        lines.append("  " + "".join(name.ljust(width) for name, width in COLUMNS).rstrip())
        for proc in app["processes"]:
            cpu = "-" if proc["cpu_percent"] is None else f"{proc['cpu_percent']:.1f}"
            cells = (
                str(proc["pid"]),
                proc["state"],
                str(proc["sessions"]),
                str(proc["processed"]),
                duration(proc["uptime"]),
                cpu,
                size(proc["rss"]),
                size(proc["pss"]),
                size(proc["uss"]),
                duration(proc["last_used"]),
            )
            lines.append(
                "  "
                + "".join(c.ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True)).rstrip()
            )
    return "\n".join(lines)


def render_event(event: dict[str, Any]) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "time"))
    return f"{event['event']}: {fields}"
