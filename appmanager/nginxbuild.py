"""Building appmanager's nginx module for the nginx installed here.

nginx loads a dynamic module only when it was built from nginx's own sources with the same
``configure`` flags (Debian's binary is built ``--with-compat``; ``nginx-dev`` ships the sources
and ``conf_flags``). A build copies those sources and the module's (``integrations/nginx/``)
into a temporary directory, configures with ``--add-dynamic-module`` and makes the module only,
about ten seconds. The ``appmanager`` executable doing the build is compiled in as the core
command the module starts by default.

Builds are cached under ``$XDG_CACHE_HOME/appmanager/nginx-module/<key>/``, the key hashing the
nginx version, its configure flags, the module's sources and the core command, so that tests and
``appmanager start --engine nginx`` build once.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
MODULE_FILE = "ngx_http_appmanager_module.so"
DEF_NAME = "appmanager_directives.def"
# Debian's nginx-dev: nginx's sources, configure, and the flags of the packaged binary.
NGINX_SRC = Path("/usr/share/nginx/src")
# Characters a core command may have: it is compiled in as a C string through a Makefile.
_SAFE_COMMAND = re.compile(r"^[A-Za-z0-9_./+@%:,=~ -]+$")


class NginxBuildError(Exception):
    """The module cannot be built here; the message says why and what to install."""


def integrations_dir() -> Path:
    """The directory holding ``nginx/`` (the module's sources) and the directive table: inside
    the package when installed with its data, beside it in a checkout or editable install."""
    for candidate in (PACKAGE_DIR / "integrations", PACKAGE_DIR.parent / "integrations"):
        if (candidate / "nginx" / "config").is_file() and (candidate / DEF_NAME).is_file():
            return candidate
    raise NginxBuildError(f"the nginx module's sources are not beside {PACKAGE_DIR}")


def module_sources() -> list[Path]:
    """Every file the build reads from appmanager: the module's directory and the table."""
    base = integrations_dir()
    files = sorted(
        p for p in (base / "nginx").iterdir() if p.name == "config" or p.suffix in (".c", ".h")
    )
    return [*files, base / DEF_NAME]


def nginx_binary() -> str:
    """The nginx executable (on the PATH, else Debian's /usr/sbin/nginx)."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    if found is None:
        raise NginxBuildError("nginx is not installed (Debian and Ubuntu: apt-get install nginx)")
    return found


def nginx_version(binary: str | None = None) -> str:
    """The installed nginx's version, e.g. ``1.22.1``."""
    out = subprocess.run(
        [binary or nginx_binary(), "-v"], capture_output=True, text=True, timeout=30
    )
    match = re.search(r"nginx/(\S+)", out.stderr + out.stdout)
    if match is None:
        raise NginxBuildError(f"cannot tell nginx's version from: {out.stderr.strip()!r}")
    return match.group(1)


def default_core_command() -> str:
    """The ``appmanager`` executable of this installation: beside the running interpreter (a
    virtual environment's bin/), else the one on the PATH."""
    beside = Path(sys.executable).parent / "appmanager"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("appmanager") or "appmanager"


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
    except NginxBuildError:
        missing.append("nginx")
        packages.append("nginx")
    if missing:
        raise NginxBuildError(
            f"building the nginx module needs {', '.join(missing)} "
            f"(Debian and Ubuntu: apt-get install {' '.join(packages)})"
        )


def _source_version() -> str:
    header = (NGINX_SRC / "src" / "core" / "nginx.h").read_text(errors="replace")
    match = re.search(r'#define\s+NGINX_VERSION\s+"([^"]+)"', header)
    return match.group(1) if match else "unknown"


def build_key(version: str, core_command: str) -> str:
    """What makes one build differ from another, hashed."""
    digest = hashlib.sha256()
    digest.update(f"{version}\0{core_command}\0".encode())
    digest.update((NGINX_SRC / "conf_flags").read_bytes() + b"\0")
    base = integrations_dir()
    for path in module_sources():
        digest.update(str(path.relative_to(base)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def cache_dir() -> Path:
    """Where built modules are kept: ``$XDG_CACHE_HOME/appmanager/nginx-module`` (~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "appmanager" / "nginx-module"


def build_module(output: str | Path | None = None, core_command: str | None = None) -> Path:
    """Build (or find in the cache) the module for the installed nginx and return its path;
    with ``output``, a copy in that directory."""
    _check_tools()
    command = core_command or default_core_command()
    if not _SAFE_COMMAND.match(command):
        raise NginxBuildError(
            f"the core command {command!r} has characters that cannot be compiled in; "
            "give another path with --core-command, or set appmanager_core_command in nginx"
        )
    version = nginx_version()
    if _source_version() != version:
        raise NginxBuildError(
            f"nginx-dev's sources are nginx {_source_version()} but nginx {version} is "
            "installed: the module must be built from the same version (apt-get install "
            "nginx nginx-dev)"
        )
    cached = cache_dir() / build_key(version, command) / MODULE_FILE
    if not cached.is_file():
        _compile(command, cached)
    if output is None:
        return cached
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / MODULE_FILE
    tmp = out_dir / f".{MODULE_FILE}.{os.getpid()}"
    shutil.copyfile(cached, tmp)
    os.replace(tmp, target)
    return target


def _compile(core_command: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="appmanager-nginx-build.") as build:
        build_dir = Path(build)
        src = build_dir / "nginx"
        shutil.copytree(NGINX_SRC, src, symlinks=True)
        # The module's directory keeps its place beside the directive table (see its config).
        module_dir = build_dir / "integrations" / "nginx"
        module_dir.mkdir(parents=True)
        base = integrations_dir()
        for path in module_sources():
            shutil.copy(path, build_dir / "integrations" / path.relative_to(base))
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
            raise NginxBuildError(f"the build made no {MODULE_FILE}")
        # Another build may finish at the same time: each copies to its own file, then renames.
        tmp = target.parent / f".{MODULE_FILE}.{os.getpid()}"
        shutil.copyfile(built, tmp)
        os.replace(tmp, target)


def _run(cmd: list[str], cwd: Path, env: dict[str, str], what: str) -> None:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise NginxBuildError(
            f"building the nginx module failed while {what}:\n"
            + (result.stdout + result.stderr)[-4000:]
        )
