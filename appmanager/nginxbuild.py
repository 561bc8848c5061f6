"""Building appmanager's nginx module for the nginx installed here.

nginx loads a dynamic module only when it was built from nginx's own sources with the same
``configure`` flags (Debian's binary is built ``--with-compat``; ``nginx-dev`` ships the sources
and ``conf_flags``). A build copies those sources and the module's (``integrations/nginx/``)
into a temporary directory, configures with ``--add-dynamic-module`` and makes the module only,
about ten seconds. The ``appmanager`` executable doing the build is compiled in as the core
command the module starts by default.

Builds are cached (``connectorbuild``), the key hashing the nginx version, its configure flags,
the module's sources and the core command, so that tests and ``appmanager start --engine nginx``
build once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from appmanager.connectorbuild import (
    BuildError,
    build_key,
    cached_build,
    copy_sources,
    default_core_command,
)

MODULE_FILE = "ngx_http_appmanager_module.so"
# Debian's nginx-dev: nginx's sources, configure, and the flags of the packaged binary.
NGINX_SRC = Path("/usr/share/nginx/src")
# Characters a core command may have: it is compiled in as a C string through a Makefile.
_SAFE_COMMAND = re.compile(r"^[A-Za-z0-9_./+@%:,=~ -]+$")


def nginx_binary() -> str:
    """The nginx executable (on the PATH, else Debian's /usr/sbin/nginx)."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    if found is None:
        raise BuildError("nginx is not installed (Debian and Ubuntu: apt-get install nginx)")
    return found


def nginx_version(binary: str | None = None) -> str:
    """The installed nginx's version, e.g. ``1.22.1``."""
    out = subprocess.run(
        [binary or nginx_binary(), "-v"], capture_output=True, text=True, timeout=30
    )
    match = re.search(r"nginx/(\S+)", out.stderr + out.stdout)
    if match is None:
        raise BuildError(f"cannot tell nginx's version from: {out.stderr.strip()!r}")
    return match.group(1)


def _check_tools() -> None:
    """Everything a build needs, or one error naming all the Debian packages missing."""
    missing: list[str] = []
    packages: list[str] = []
    if not (shutil.which("cc") or shutil.which("gcc")) or not shutil.which("make"):
        missing.append("a C compiler and make")
        packages.append("build-essential")
    if not (NGINX_SRC / "configure").is_file() or not (NGINX_SRC / "conf_flags").is_file():
        missing.append(f"nginx's sources and build flags ({NGINX_SRC})")
        packages.append("nginx-dev")
    try:
        nginx_binary()
    except BuildError:
        missing.append("nginx")
        packages.append("nginx")
    if missing:
        raise BuildError(
            f"building the nginx module needs {', '.join(missing)} "
            f"(Debian and Ubuntu: apt-get install {' '.join(packages)})"
        )


def _source_version() -> str:
    header = (NGINX_SRC / "src" / "core" / "nginx.h").read_text(errors="replace")
    match = re.search(r'#define\s+NGINX_VERSION\s+"([^"]+)"', header)
    return match.group(1) if match else "unknown"


def build_module(output: str | Path | None = None, core_command: str | None = None) -> Path:
    """Build (or find in the cache) the module for the installed nginx and return its path;
    with ``output``, a copy in that directory."""
    _check_tools()
    command = core_command or default_core_command()
    if not _SAFE_COMMAND.match(command):
        raise BuildError(
            f"the core command {command!r} has characters that cannot be compiled in; "
            "give another path with --core-command, or set appmanager_core_command in nginx"
        )
    version = nginx_version()
    if _source_version() != version:
        raise BuildError(
            f"nginx-dev's sources are nginx {_source_version()} but nginx {version} is "
            "installed: the module must be built from the same version (apt-get install "
            "nginx nginx-dev)"
        )
    flags = (NGINX_SRC / "conf_flags").read_bytes()
    key = build_key("nginx", version, command, flags)
    return cached_build(
        "nginx", key, MODULE_FILE, lambda build_dir: _compile(command, build_dir), output
    )


def _compile(core_command: str, build_dir: Path) -> Path:
    src = build_dir / "nginx"
    shutil.copytree(NGINX_SRC, src, symlinks=True)
    # The module's directory keeps its place beside the directive table (see its config).
    module_dir = copy_sources("nginx", build_dir / "integrations")
    env = dict(os.environ, APPMANAGER_CORE_COMMAND=core_command)
    configure = (
        'source ./conf_flags && ./configure "${NGX_CONF_FLAGS[@]}" '
        f'--add-dynamic-module="{module_dir}"'
    )
    _run(["bash", "-c", configure], src, env, "configuring nginx")
    jobs = str(os.cpu_count() or 1)
    _run(["make", "-f", "objs/Makefile", "-j", jobs, "modules"], src, env, "make")
    built = src / "objs" / MODULE_FILE
    if not built.is_file():
        raise BuildError(f"the build made no {MODULE_FILE}")
    return built


def _run(cmd: list[str], cwd: Path, env: dict[str, str], what: str) -> None:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(
            f"building the nginx module failed while {what}:\n"
            + (result.stdout + result.stderr)[-4000:]
        )
