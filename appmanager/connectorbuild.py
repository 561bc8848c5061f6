"""What building the nginx and Apache modules shares: finding their sources, the core command
compiled in, and the cache of built modules.

Each module is compiled from ``integrations/<server>/`` and the directive table beside it
(``integrations/appmanager_directives.def``), with this installation's ``appmanager`` executable
as the core command it starts by default. Builds are cached under
``$XDG_CACHE_HOME/appmanager/<server>-module/<key>/``, the key hashing everything that goes into
the build, so that tests and the commands build once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEF_NAME = "appmanager_directives.def"


class BuildError(Exception):
    """A module cannot be built here; the message says why and what to install."""


def integrations_dir(server: str) -> Path:
    """The directory holding ``<server>/`` (the module's sources) and the directive table: inside
    the package when installed with its data, beside it in a checkout or editable install."""
    for candidate in (PACKAGE_DIR / "integrations", PACKAGE_DIR.parent / "integrations"):
        if (candidate / server).is_dir() and (candidate / DEF_NAME).is_file():
            return candidate
    raise BuildError(f"the {server} module's sources are not beside {PACKAGE_DIR}")


def module_sources(server: str) -> list[Path]:
    """Every file a build reads from appmanager: the module's C files (and nginx's ``config``
    script) and the directive table; nothing else, so that editing a README rebuilds nothing."""
    base = integrations_dir(server)
    files = sorted(
        p for p in (base / server).iterdir() if p.name == "config" or p.suffix in (".c", ".h")
    )
    return [*files, base / DEF_NAME]


def copy_sources(server: str, build_dir: Path) -> Path:
    """Copy the module's sources into ``build_dir``, keeping their places relative to each other
    (the modules include the table from their parent directory); returns the module's
    directory there."""
    base = integrations_dir(server)
    (build_dir / server).mkdir(parents=True)
    for path in module_sources(server):
        shutil.copy(path, build_dir / path.relative_to(base))
    return build_dir / server


def build_key(server: str, *facts: str | bytes) -> str:
    """What makes one build differ from another, hashed: ``facts`` (the web server's version and
    flags, the core command) and every source file, by its path and content."""
    digest = hashlib.sha256()
    for fact in facts:
        digest.update((fact.encode() if isinstance(fact, str) else fact) + b"\0")
    base = integrations_dir(server)
    for path in module_sources(server):
        digest.update(str(path.relative_to(base)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def default_core_command() -> str:
    """The ``appmanager`` executable of this installation: beside the running interpreter (a
    virtual environment's bin/), else the one on the PATH."""
    beside = Path(sys.executable).parent / "appmanager"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("appmanager") or "appmanager"


def cache_dir(server: str) -> Path:
    """Where built modules are kept: ``$XDG_CACHE_HOME/appmanager/<server>-module`` (~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "appmanager" / f"{server}-module"


def cached_build(
    server: str,
    key: str,
    file_name: str,
    compile_into: Callable[[Path], Path],
    output: str | Path | None = None,
) -> Path:
    """The module built for ``key``: from the cache, else compiled by ``compile_into`` (given a
    fresh temporary directory, it returns the built file) and cached; with ``output``, a copy
    in that directory."""
    cached = cache_dir(server) / key / file_name
    if not cached.is_file():
        with tempfile.TemporaryDirectory(prefix=f"appmanager-{server}-build.") as build:
            _publish(compile_into(Path(build)), cached)
    if output is None:
        return cached
    return _publish(cached, Path(output) / file_name)


def _publish(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Another build may finish at the same time: each copies to its own file, then renames, so
    # that nobody loads a half-written module.
    tmp = target.parent / f".{target.name}.{os.getpid()}"
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return target
