"""Which user an app's processes run as: user switching, safe by default, as Passenger does it.

When the core runs as root, every process of an app (a shim, a preloader and so the processes it
forks, a Node process, a generic command) runs as the owner of the app's startup file (for a generic
app, of the app root), with that user's primary and supplementary groups, and HOME, USER and LOGNAME
set for it. It never runs as root: when the owner is root, or has no entry in the user database, the
processes run as ``nobody`` (with its group, ``nogroup`` on Debian). ``--user`` and ``--group``
override the owner and its primary group.

When the core does not run as root nothing is switched: the processes run as the core's own user,
and ``settings.py`` refuses a ``--user`` or ``--group`` other than the core's own.

The owner is looked up with ``lstat``: a symbolic link counts as its own owner's, so that whoever
may create files in an app root cannot make the app run as the owner of a file it links to.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appmanager.spawnerror import SpawnError

if TYPE_CHECKING:
    from appmanager.group import Group

DEFAULT_USER = "nobody"


@dataclass(frozen=True)
class RunAs:
    """A user to run processes as: its name, uid, primary gid, supplementary gids and home."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    def environment(self) -> dict[str, str]:
        """The variables a login of this user would have, which the core's own would contradict."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}


def switching() -> bool:
    """Whether the core switches users at all: only when it runs as root."""
    return os.geteuid() == 0


def current_user() -> str:
    """The name of the user the core runs as (its uid when it has no name)."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def process_user(pid: int) -> str:
    """The name of the user process ``pid`` runs as (its uid when it has no name, ``?`` when it is
    gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            uid = next(int(line.split()[2]) for line in f if line.startswith("Uid:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return "?"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def run_as(group: Group) -> RunAs | None:
    """Who ``group``'s processes run as, looked up afresh for each spawn (an app's owner may change
    while the core runs); None when the core does not switch users. Raises ``SpawnError``."""
    settings = group.settings
    if not switching() or not settings["user_switching"]:
        return None
    user = _user(settings["user"], _owned_path(group))
    gid = user.pw_gid
    if settings["group"]:
        gid = _group_id(settings["group"])
    elif gid == 0:
        # An owner whose primary group is root gets the default user's group instead.
        gid = _default_user().pw_gid
    groups = tuple(os.getgrouplist(user.pw_name, gid))
    return RunAs(user.pw_name, user.pw_uid, gid, groups, user.pw_dir)


def _owned_path(group: Group) -> str:
    """The file whose owner the app runs as: its startup file, or the app root for a generic app."""
    spec = group.spec
    if not spec.startup_file:
        return spec.root
    return os.path.join(spec.root, spec.startup_file)


def _user(name: str | None, path: str) -> pwd.struct_passwd:
    if name:
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            raise SpawnError("PREPARE", f"user {name} (--user) does not exist") from None
    else:
        try:
            owner = os.lstat(path).st_uid
        except OSError as exc:
            raise SpawnError(
                "PREPARE", f"cannot find the owner of {path}: {exc.strerror}"
            ) from None
        try:
            user = pwd.getpwuid(owner)
        except KeyError:
            user = _default_user()
    if user.pw_uid == 0:
        user = _default_user()
    return user


def _default_user() -> pwd.struct_passwd:
    try:
        user = pwd.getpwnam(DEFAULT_USER)
    except KeyError:
        raise SpawnError(
            "PREPARE",
            f"the app is owned by root and user {DEFAULT_USER}, which runs such apps, does not "
            "exist; name a user with --user",
        ) from None
    if user.pw_uid == 0:
        raise SpawnError("PREPARE", f"user {DEFAULT_USER} is root; name a user with --user")
    return user


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise SpawnError("PREPARE", f"group {name} (--group) does not exist") from None
