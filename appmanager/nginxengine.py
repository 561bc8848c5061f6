"""``appmanager start --engine nginx``: nginx in front of the core its module starts.

As Passenger Standalone's nginx engine does: nginx listens on the address and port, serves the
apps' ``public/`` files and TLS, and hands the rest to the core, which the module starts with
nginx and which stops when nginx stops. This process writes the configuration into a private run
directory, runs nginx in the foreground in a session of its own (so that a terminal's Ctrl-C
reaches only this process, which then stops nginx gracefully), waits for nginx and then for the
core to exit, and removes the run directory.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import psutil

from appmanager import __version__, nginxbuild, nginxconf
from appmanager.connectorbuild import BuildError
from appmanager.pidfile import pid_file

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# Waiting for nginx to start includes waiting for the core (the module waits up to 30 s).
START_TIMEOUT = 60.0


class EngineError(Exception):
    """nginx cannot be started as asked; the message says why."""


def _prctl(option: int, value: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, value, 0, 0, 0)
    except OSError:
        pass


def _die_with_parent() -> None:
    """In nginx, before exec: a stop nobody asked for (this process killed) still stops it."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class NginxEngine:
    """One nginx (and the core its module starts) serving a ``config.Plan``, from start to
    stop. Lives as long as ``appmanager start``; nginx and the core do not outlive it."""

    def __init__(self, plan: Any) -> None:
        self.plan = plan
        self.values = plan.settings
        self.run_dir = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._signals: list[int] = []

    def run(self, out: IO[str]) -> int:
        """Start nginx, print the banner to ``out`` once it serves, and run until a signal;
        returns the exit status."""
        if self.values["daemonize"]:
            raise EngineError("--daemonize is not available with --engine nginx")
        if bool(self.values["ssl_certificate"]) != bool(self.values["ssl_certificate_key"]):
            raise EngineError("--ssl-certificate and --ssl-certificate-key go together")
        try:
            module = nginxbuild.build_module()
            binary = nginxbuild.nginx_binary()
        except BuildError as exc:
            raise EngineError(str(exc)) from None
        # The core is nginx's child; once nginx has exited it becomes ours, to wait for.
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        self.run_dir = tempfile.mkdtemp(prefix="appmanager-nginx.")
        try:
            return self._run(binary, str(module), out)
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _run(self, binary: str, module: str, out: IO[str]) -> int:
        # nginx's workers (nobody, when started as root) reach their temporary files in here.
        os.chmod(self.run_dir, 0o711)
        instance_dir = self.values["instance_dir"] or os.path.join(self.run_dir, "instance")
        conf = os.path.join(self.run_dir, "nginx.conf")
        text = nginxconf.render(
            self.plan,
            module=module,
            run_dir=self.run_dir,
            instance_dir=os.path.abspath(instance_dir),
            origin="appmanager start --engine nginx",
            error_log="stderr",
            log_level="warn",
        )
        Path(conf).write_text(text)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self.proc = subprocess.Popen(
            [binary, "-p", self.run_dir, "-c", conf],
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        if not self._wait_ready():
            return self._stop()
        core = self._core()
        self._banner(out, binary, core)
        while not self._signals and self.proc.poll() is None:
            time.sleep(0.1)
        return self._stop(core)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Handlers only note the signal; the loop in _run and _stop act on it.
        self._signals.append(signum)

    def _wait_ready(self) -> bool:
        """nginx writes its pid file once its modules have started (and the core listens);
        then its workers accept. False when nginx exits or a signal comes first."""
        assert self.proc is not None
        pid_file = os.path.join(self.run_dir, "nginx.pid")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and not self._signals:
            if self.proc.poll() is not None:
                return False
            if os.path.exists(pid_file) and self._accepts():
                return True
            time.sleep(0.05)
        return False

    def _accepts(self) -> bool:
        address = self.values["address"]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect((address, int(self.values["port"])))
            except OSError:
                return False
        return True

    def _core(self) -> psutil.Process | None:
        """The core nginx's module started: the master's child with a lifeline."""
        assert self.proc is not None
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return None
        for child in children:
            try:
                if "--lifeline-fd" in child.cmdline():
                    return child
            except psutil.Error:
                continue
        return None

    def _banner(self, out: IO[str], binary: str, core: psutil.Process | None) -> None:
        scheme = "https" if self.values["ssl_certificate"] else "http"
        address = self.values["address"]
        host = f"[{address}]" if ":" in address else address
        lines = [f"appmanager {__version__} with nginx ({binary})"]
        for app in self.plan.apps:
            where = f"{scheme}://{host}:{self.values['port']}{app.base_uri or ''}/"
            names = f" for {', '.join(app.server_names)}" if app.server_names else ""
            lines.append(f"  {app.name}: {where}{names} ({app.spec.root})")
        lines.append(f"  nginx pid:    {self.proc.pid if self.proc else '?'}")
        lines.append(f"  core pid:     {core.pid if core else '?'}")
        lines.append(f"  nginx config: {os.path.join(self.run_dir, 'nginx.conf')}")
        lines.append("Serving; press Ctrl-C to stop.")
        out.write("\n".join(lines) + "\n")
        out.flush()

    def _stop(self, core: psutil.Process | None = None) -> int:
        """Stop nginx (gracefully; a second signal hurries it) and wait for the core, which
        stops when its lifeline from nginx closes."""
        assert self.proc is not None
        core = core or self._core()
        watched = [core] if core is not None else []
        if core is not None:
            try:
                watched += core.children(recursive=True)
            except psutil.Error:
                pass
        sent = 0
        while self.proc.poll() is None:
            wanted = len(self._signals) if self._signals else 1
            if sent < wanted:
                sig = signal.SIGQUIT if sent == 0 else signal.SIGTERM
                try:
                    self.proc.send_signal(sig)
                except ProcessLookupError:
                    break
                sent += 1
            time.sleep(0.05)
        status = self.proc.wait()
        timeout = float(self.values["shutdown_timeout"]) + 10.0
        psutil.wait_procs(watched, timeout=timeout)
        return 0 if status in (0, -signal.SIGQUIT, -signal.SIGTERM) else 1


def run_engine(plan: Any) -> int:
    """Serve ``plan`` with nginx in front of the core; returns the exit status."""
    with pid_file(plan.settings["pid_file"]):
        try:
            return NginxEngine(plan).run(sys.stdout)
        except EngineError as exc:
            print(f"appmanager: {exc}", file=sys.stderr)
            return 1
