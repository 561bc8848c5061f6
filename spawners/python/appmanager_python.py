"""appmanager's spawner shim for Python apps: WSGI (PEP 3333) and ASGI 3.

The core execs this file with the app root as working directory, the control channel on fd 3 and
the progress file on fd 4 (docs/protocol/spawn.md). The shim loads the app, decides whether it is
a WSGI or an ASGI app, answers READY, then serves the requests the core hands over with the client
connection's descriptor (docs/protocol/handoff.md), writing each response straight to the client.
With ``"spawn_method": "smart"`` it is a preloader instead: it answers PRELOADER and forks the
processes that serve, each with the app already loaded.

This file is the handshake; the servers live next to it and are imported by the processes that
run them (a WSGI process never loads asyncio):

- ``appmanager_python_handoff.py``: the handoff protocol both servers speak
- ``appmanager_python_wsgi.py``: the WSGI server, one request at a time
- ``appmanager_python_asgi.py``: the ASGI server, an asyncio loop with many requests at once
- ``appmanager_python_websocket.py``: WebSocket connections (RFC 6455) for the ASGI server
- ``appmanager_python_http.py``: whole client connections (HTTP/1.1) for the ASGI server
- ``appmanager_python_httpparse.py``: their request parser (httptools, or pure Python)
- ``appmanager_python_preloader.py``: smart spawning, the preloader and its forked processes

Standard library only: it runs under whatever interpreter, and virtualenv, the app uses.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import io
import json
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    # Run as a script, the shim imports its modules from its own directory; mypy, run from the
    # repository root, knows them by their package path.
    from spawners.python import appmanager_python_handoff as handoff
    from spawners.python import appmanager_python_preloader as preloader
    from spawners.python.appmanager_python_asgi import Worker as AsgiWorker
    from spawners.python.appmanager_python_wsgi import Worker as WsgiWorker
else:
    import appmanager_python_handoff as handoff
    import appmanager_python_preloader as preloader

PROTOCOL = 1
# The app types SPAWN may name: "python" lets the shim decide between the two others.
APP_TYPES = ("python", "wsgi", "asgi")
# How SPAWN may ask for processes: "direct" serves itself, "smart" preloads and forks (spawn.md).
SPAWN_METHODS = ("direct", "smart")
# The module of each app type's server, imported only once the app type is known.
WORKER_MODULES = {"wsgi": "appmanager_python_wsgi", "asgi": "appmanager_python_asgi"}
# An ERROR message must fit in one control-channel message; a traceback's end is the useful part.
MAX_TRACEBACK = 64 * 1024

ProtocolError = handoff.ProtocolError
log = handoff.log


class NoCallableError(LookupError):
    """The startup file loaded, but none of the names in ``callables`` is a callable in it."""


# The handshake


@dataclass(frozen=True)
class SpawnConfig:
    """What the SPAWN message says about the app; unknown keys are ignored (spawn.md)."""

    protocol: int
    app_root: str
    app_type: str
    startup_file: str
    callables: tuple[str, ...]
    environment: str
    base_uri: str
    app_name: str
    spawn_method: str
    # The core's pid, which a forked process may find as its parent once the preloader is gone;
    # None when SPAWN does not say (then it is the preloader's parent).
    core_pid: int | None
    # For the connections an ASGI process serves whole (handoff.md): whether the core keeps an
    # access log (each response is reported), and its max_requests (how often requests are).
    access_log: bool = False
    max_requests: int = 0

    @classmethod
    def from_message(cls, message: bytes) -> SpawnConfig:
        """Parses ``SPAWN {json}``; raises ProtocolError when it is anything else."""
        tag, _, payload = message.partition(b" ")
        if tag != b"SPAWN":
            raise ProtocolError(f"expected a SPAWN message, got {message[:40]!r}")
        try:
            data = json.loads(payload)
        except ValueError as exc:
            raise ProtocolError(f"SPAWN message is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ProtocolError("SPAWN message is not a JSON object")
        try:
            return cls(
                protocol=int(data["protocol"]),
                app_root=str(data["app_root"]),
                app_type=str(data.get("app_type", "python")),
                startup_file=str(data["startup_file"]),
                callables=callable_names(data.get("callables")),
                environment=str(data.get("environment", "production")),
                base_uri=str(data.get("base_uri") or ""),
                app_name=str(data.get("app_name", "")),
                spawn_method=str(data.get("spawn_method") or "direct"),
                core_pid=int(data["core_pid"]) if data.get("core_pid") else None,
                access_log=data.get("access_log") is True,
                max_requests=int(data.get("max_requests") or 0),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"SPAWN message lacks or mangles a key: {exc!r}") from None


def callable_names(value: Any) -> tuple[str, ...]:
    """The ``callables`` key as a tuple of names; a lone string is one name, not letters."""
    if value is None:
        return ("application",)
    if isinstance(value, str):
        return (value,)
    return tuple(str(name) for name in value)


def send_message(control: socket.socket, tag: str, payload: dict[str, Any]) -> None:
    """Sends one handshake message, ``TAG {json}``."""
    control.send(tag.encode() + b" " + json.dumps(payload).encode())


def prepare(config: SpawnConfig, control_fd: int, progress_fd: int, parent_pid: int) -> None:
    """Step PREPARE: checks the protocol, ties the process to the core, enters the app root."""
    if config.protocol != PROTOCOL:
        raise ProtocolError(
            f"the core speaks protocol {config.protocol}; this shim speaks {PROTOCOL}"
        )
    if config.app_type not in APP_TYPES:
        raise ProtocolError(f"app_type {config.app_type!r} is not served by the Python shim")
    if config.spawn_method not in SPAWN_METHODS:
        raise ProtocolError(f"spawn_method {config.spawn_method!r} is not one of {SPAWN_METHODS}")
    # Subprocesses the app starts must not keep the control channel open: the core counts on EOF.
    os.set_inheritable(control_fd, False)
    os.set_inheritable(progress_fd, False)
    die_with_parent(parent_pid)
    # sys.path[0] is this shim's directory; the app root takes its place so the app's modules win,
    # and the shim's directory moves to the end, where the server modules are imported from once
    # the app type is known. Compared before chdir, which would change what a relative entry means.
    app_root = os.path.abspath(config.app_root)
    shim_dir = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == shim_dir:
        sys.path[0] = app_root
    else:
        sys.path.insert(0, app_root)
    sys.path.append(shim_dir)
    os.chdir(app_root)


def die_with_parent(parent_pid: int) -> None:
    """Asks Linux to SIGKILL this process when the core dies, and exits if it already has.

    Best effort: other systems have no PR_SET_PDEATHSIG and rely on EOF on the control channel.
    """
    if not preloader.set_parent_death_signal(signal.SIGKILL):
        return
    # The core may have died before prctl took effect; then nothing would ever kill us.
    if os.getppid() != parent_pid:
        os._exit(1)


def load_app(config: SpawnConfig) -> tuple[ModuleType, Callable[..., Any]]:
    """Step LOAD_APP: imports the startup file; returns it and the first callable it names."""
    module = import_startup_file(config.startup_file, config.app_root)
    return module, find_callable(module, config.callables, config.startup_file)


def served_as(app_type: str, app: Callable[..., Any]) -> str:
    """The app type the app is served as: ``app_type`` itself when SPAWN forces "wsgi" or
    "asgi"; for "python", "asgi" when the app is an ASGI 3 app, "wsgi" otherwise."""
    if app_type != "python":
        return app_type
    return "asgi" if is_asgi_app(app) else "wsgi"


def is_asgi_app(app: Callable[..., Any]) -> bool:
    """Whether ``app`` is an ASGI 3 app: a coroutine function, or an object whose ``__call__``
    is one (FastAPI, Starlette, Django's ASGIHandler).

    A class is never one: calling it makes an instance, which is how a WSGI app may be written
    (PEP 3333) and how ASGI 2 apps were, a protocol this shim does not serve. An ASGI app that
    hides its coroutine behind a plain function needs ``--app-type asgi``.
    """
    if isinstance(app, type):
        return False
    return inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(
        getattr(app, "__call__", None)  # noqa: B004 - the method itself is what is examined
    )


def worker_class(app_type: str) -> type[WsgiWorker] | type[AsgiWorker]:
    """The server for an app type, imported now: each process loads only the one it runs."""
    module = importlib.import_module(WORKER_MODULES[app_type])
    worker: type[WsgiWorker] | type[AsgiWorker] = module.Worker
    return worker


def package_module_name(startup_file: str, app_root: str) -> tuple[str, str] | None:
    """The dotted module name of a startup file inside packages under the app root, and the
    directory that name is importable from; None when the file is not inside a package.

    ``/srv/app/mysite/wsgi.py`` next to ``/srv/app/mysite/__init__.py`` gives
    ``("mysite.wsgi", "/srv/app")``.
    """
    root = os.path.realpath(app_root)
    directory, filename = os.path.split(os.path.realpath(startup_file))
    stem, ext = os.path.splitext(filename)
    if ext != ".py" or not stem.isidentifier():
        return None
    parts = [stem]
    while (
        directory != root
        and directory.startswith(root + os.sep)
        and os.path.isfile(os.path.join(directory, "__init__.py"))
    ):
        package = os.path.basename(directory)
        if not package.isidentifier():
            return None
        parts.insert(0, package)
        directory = os.path.dirname(directory)
    if len(parts) == 1:
        return None
    return ".".join(parts), directory


def import_startup_file(startup_file: str, app_root: str) -> ModuleType:
    """Imports the startup file the way spawn.md says: by dotted name inside packages (so that
    Django's relative imports work), otherwise as a module named after the file."""
    dotted = package_module_name(startup_file, app_root)
    if dotted is not None:
        name, import_root = dotted
        if import_root not in sys.path and os.path.realpath(import_root) != os.path.realpath(
            app_root
        ):
            sys.path.insert(1, import_root)
        module = importlib.import_module(name)
        loaded_from = getattr(module, "__file__", None) or "?"
        # An installed package of the same name would shadow the app's; say so instead of
        # serving the wrong code.
        if os.path.realpath(loaded_from) != os.path.realpath(startup_file):
            raise ImportError(f"{name} was imported from {loaded_from}, not from {startup_file}")
        return module

    # As when the file runs as a script, modules next to it are importable.
    directory = os.path.dirname(os.path.abspath(startup_file))
    if directory not in sys.path and os.path.realpath(directory) != os.path.realpath(app_root):
        sys.path.insert(1, directory)
    # By path, with an explicit loader: startup files such as "app.wsgi" do not end in ".py".
    name = os.path.basename(startup_file).split(".", 1)[0] or "startup_file"
    loader = importlib.machinery.SourceFileLoader(name, startup_file)
    spec = importlib.util.spec_from_file_location(name, startup_file, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, like any import, so that the file may import itself.
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def find_callable(
    module: ModuleType, names: Iterable[str], startup_file: str
) -> Callable[..., Any]:
    """Returns the first of ``names`` that the module defines as a callable."""
    names = tuple(names)
    not_callable = []
    for name in names:
        obj = getattr(module, name, None)
        if obj is None:
            continue
        if callable(obj):
            return obj  # type: ignore[no-any-return]
        not_callable.append(f"{name!r} is a {type(obj).__name__}")
    looked_for = " or ".join(repr(name) for name in names) or "(no names given)"
    detail = f" ({'; '.join(not_callable)})" if not_callable else ""
    raise NoCallableError(f"no app callable named {looked_for} in {startup_file}{detail}")


def failure_message(step: str, exc: BaseException) -> dict[str, str]:
    """The ERROR payload for an exception raised during ``step``."""
    if isinstance(exc, handoff.StartupFailed):
        # The app said why itself; the traceback, if any, is of what made it fail.
        message = str(exc)
        cause = exc.__cause__
        text = "".join(traceback.format_exception(cause)) if cause is not None else ""
    else:
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        text = "".join(traceback.format_exception(exc))
    if len(text) > MAX_TRACEBACK:
        text = "...\n" + text[-MAX_TRACEBACK:]
    return {"step": step, "message": message, "traceback": text}


# Serving requests


def main() -> int:
    """Runs the handshake, then serves until the core closes the control channel; or, for smart
    spawning, preloads the app and forks the processes that serve."""
    parent_pid = os.getppid()
    # The core handles Ctrl-C for the whole process group and stops us with EOF or TERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            # Pipes to the core: each line must reach it when written, not when a buffer fills.
            stream.reconfigure(line_buffering=True)

    control_fd = int(os.environ.get("APPMANAGER_CONTROL_FD", "3"))
    progress_fd = int(os.environ.get("APPMANAGER_PROGRESS_FD", "4"))
    try:
        control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=control_fd)
    except OSError as exc:
        log(f"fd {control_fd} is not a control channel ({exc}); this file is run by appmanager")
        return 2

    step = "PREPARE"
    try:
        config = SpawnConfig.from_message(control.recv(handoff.MAX_MESSAGE))
        prepare(config, control_fd, progress_fd, parent_pid)
        step = "LOAD_APP"
        module, app = load_app(config)
        app_type = served_as(config.app_type, app)
        server = worker_class(app_type)
    except BaseException as exc:  # SystemExit from the app's import is a failed LOAD_APP too
        return fail(control, step, exc)
    forked = None
    if config.spawn_method == "smart":
        forked = preload(control, control_fd, progress_fd, config.core_pid or parent_pid, app_type)
        if isinstance(forked, int):
            return forked
        # A forked process from here on: its own channels, and what fails is step LISTEN.
        control, progress_fd = forked.control, forked.progress_fd
        step = "LISTEN"
    try:
        if forked is not None:
            preloader.run_after_fork_hook(module)
        development = config.environment == "development"
        if app_type == "asgi":
            worker: WsgiWorker | AsgiWorker = cast("type[AsgiWorker]", server)(
                control,
                progress_fd,
                app,
                config.base_uri,
                development,
                access_log=config.access_log,
                max_requests=config.max_requests,
            )
        else:
            worker = server(control, progress_fd, app, config.base_uri, development)
        # The app's own start-up (an ASGI app's lifespan) is part of loading it, or, in a forked
        # process, of getting ready to listen.
        worker.startup()
        step = "LISTEN"
        worker.listen()
    except BaseException as exc:
        return fail(control, step, exc)
    ready: dict[str, Any] = {
        "pid": os.getpid(),
        "concurrency": worker.concurrency,
        "protocol": PROTOCOL,
        "app_type": app_type,
    }
    if worker.takes_connections:
        ready["connections"] = True
    try:
        send_message(control, "READY", ready)
    except OSError as exc:
        log(f"the core went away before READY: {exc}")
        return 1
    worker.serve()
    return 0


def fail(control: socket.socket, step: str, exc: BaseException) -> int:
    """Answers ERROR for a failed step; returns the exit status that goes with it."""
    try:
        send_message(control, "ERROR", failure_message(step, exc))
    except OSError:
        traceback.print_exception(exc)
    return 1


def preload(
    control: socket.socket, control_fd: int, progress_fd: int, core_pid: int, app_type: str
) -> preloader.ForkedChannels | int:
    """Smart spawning, once the app is loaded: answers PRELOADER and forks processes on command
    until the core lets go of the preloader; returns the preloader's exit status then. In each
    forked process it returns that process's own channels instead."""
    # The preloader takes over SIGCHLD and SIGTERM before the core can ask it for anything.
    loop = preloader.Preloader(control, control_fd, progress_fd, core_pid)
    answer = {"pid": os.getpid(), "app_type": app_type, "protocol": PROTOCOL}
    try:
        send_message(control, "PRELOADER", answer)
    except OSError as exc:
        log(f"the core went away before PRELOADER: {exc}")
        return 1
    forked = loop.serve()
    return 0 if forked is None else forked


if __name__ == "__main__":
    sys.exit(main())
