"""User switching: a core running as root runs each app as the owner of its startup file (never as
root), or as --user/--group; the app cannot write the core's instance directory."""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import APPS, Server, get, request, start_server

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="user switching needs the tests to run as root"
)

BIG_BODY = os.urandom(200 * 1024)  # past the 64 KiB inline limit: spooled, passed as a descriptor


@pytest.fixture
def server_factory(server_factory):  # type: ignore[no-untyped-def]
    """The suite's server_factory with user switching on (the suite turns it off as root)."""

    def factory(app_dir, *args, **kw):  # type: ignore[no-untyped-def]
        return server_factory(app_dir, "--user-switching", "on", *args, **kw)

    return factory


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class Accounts:
    owner: Account  # owns the app copies
    other: Account  # for --user
    extra_group: str  # a supplementary group of owner, also used for --group
    extra_gid: int


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _account(name: str) -> Account:
    entry = pwd.getpwnam(name)
    return Account(name, entry.pw_uid, entry.pw_gid)


@pytest.fixture(scope="module")
def accounts() -> Iterator[Accounts]:
    """Two system users with a group each, the first also in an extra group; removed afterwards."""
    tag = os.getpid()
    owner, other, extra = f"amown{tag}", f"amoth{tag}", f"amgrp{tag}"
    _run("groupadd", "--system", extra)
    _run("useradd", "--system", "--no-create-home", "--user-group", "-G", extra, owner)
    _run("useradd", "--system", "--no-create-home", "--user-group", other)
    try:
        probe = subprocess.run(
            ["su", "-s", "/bin/sh", "-c", f"{sys.executable} -c pass", owner],
            capture_output=True,
            text=True,
        )
        assert probe.returncode == 0, (
            f"user {owner} cannot run {sys.executable} ({probe.stderr.strip()}): run the suite "
            "with an interpreter outside private directories, e.g. scripts/test's .venv"
        )
        yield Accounts(_account(owner), _account(other), extra, grp.getgrnam(extra).gr_gid)
    finally:
        for user in (owner, other):
            subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", extra], capture_output=True)
        for group in (owner, other):
            subprocess.run(["groupdel", group], capture_output=True)


@pytest.fixture(scope="module")
def apps(accounts: Accounts) -> Iterator[Path]:
    """Copies of the test apps in a directory every user can traverse (pytest's own are private):
    ``owned/NAME`` belong to the owner account, ``root/NAME`` to root."""
    base = Path(tempfile.mkdtemp(prefix="appmanager-users-", dir="/tmp"))
    try:
        base.chmod(0o755)
        for kind in ("owned", "root"):
            (base / kind).mkdir(mode=0o755)
            for name in ("wsgi_echo", "echo_rack", "echo_node", "generic_app"):
                shutil.copytree(APPS / name, base / kind / name)
        for path in (base / "owned").rglob("*"):
            os.chown(path, accounts.owner.uid, accounts.owner.gid, follow_symlinks=False)
        for path in (base / "root").rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _status_groups(pid: int) -> set[int]:
    """A process's supplementary groups."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Groups:"):
            return {int(g) for g in line.split()[1:]}
    raise AssertionError("no Groups line")


def _assert_runs_as(proc: psutil.Process, uid: int, gid: int) -> None:
    assert tuple(proc.uids()) == (uid, uid, uid), (proc.pid, proc.cmdline())
    assert tuple(proc.gids()) == (gid, gid, gid), (proc.pid, proc.cmdline())
    assert 0 not in _status_groups(proc.pid)


def _serving_pid(server: Server) -> int:
    resp = get(server.port, "/app/pid")
    assert resp.status == 200, resp
    return int(resp.body)


def _post(port: int, path: str, body: bytes) -> dict[str, object]:
    raw = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    resp = request(port, raw, timeout=60)
    assert resp.status == 200, resp
    answer: dict[str, object] = json.loads(resp.body)
    return answer


def _assert_upload_works(port: int, path: str = "/conformance") -> None:
    answer = _post(port, path, BIG_BODY)
    assert answer["body_len"] == len(BIG_BODY)
    assert answer["body_sha256"] == hashlib.sha256(BIG_BODY).hexdigest()


def _need(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed")


def test_python_app_runs_as_the_owner_of_its_startup_file(
    server_factory, accounts: Accounts, apps: Path
) -> None:
    """Smart spawning (the default): the preloader and the processes it forks run as the owner,
    with its groups and environment."""
    owner = accounts.owner
    server = server_factory(apps / "owned" / "wsgi_echo", "--min-instances", "2")
    processes = server.app_processes()
    assert len(processes) == 2
    preloaders = server.preloader_pids()
    assert len(preloaders) == 1
    for proc in [*processes, psutil.Process(preloaders.pop())]:
        _assert_runs_as(proc, owner.uid, owner.gid)
        assert proc.username() == owner.name
        assert accounts.extra_gid in _status_groups(proc.pid)
        env = proc.environ()
        assert env["USER"] == env["LOGNAME"] == owner.name
        assert env["HOME"] == pwd.getpwnam(owner.name).pw_dir
    pid = _serving_pid(server)
    assert pid in {p.pid for p in processes}
    log = server.log()
    assert re.search(rf"process {pid} forked by preloader \d+ in \d+ ms as user {owner.name}", log)
    assert f"spawned for app wsgi_echo as user {owner.name}" in log
    _assert_upload_works(server.port)


def test_direct_spawning_runs_as_the_owner(server_factory, accounts: Accounts, apps: Path) -> None:
    server = server_factory(apps / "owned" / "wsgi_echo", "--spawn-method", "direct")
    pid = _serving_pid(server)
    _assert_runs_as(psutil.Process(pid), accounts.owner.uid, accounts.owner.gid)
    server.wait_for_log(f"process {pid} spawned for app wsgi_echo as user {accounts.owner.name}")
    _assert_upload_works(server.port)


def test_rack_app_runs_as_the_owner(server_factory, accounts: Accounts, apps: Path) -> None:
    _need("ruby")
    server = server_factory(apps / "owned" / "echo_rack")
    pid = _serving_pid(server)
    _assert_runs_as(psutil.Process(pid), accounts.owner.uid, accounts.owner.gid)
    for preloader in server.preloader_pids():
        _assert_runs_as(psutil.Process(preloader), accounts.owner.uid, accounts.owner.gid)
    _assert_upload_works(server.port)


def test_node_app_runs_as_the_owner(server_factory, accounts: Accounts, apps: Path) -> None:
    _need("node")
    server = server_factory(apps / "owned" / "echo_node")
    pid = _serving_pid(server)
    proc = psutil.Process(pid)
    _assert_runs_as(proc, accounts.owner.uid, accounts.owner.gid)
    assert proc.environ()["HOME"] == pwd.getpwnam(accounts.owner.name).pw_dir
    server.wait_for_log(f"process {pid} spawned for app echo_node as user {accounts.owner.name}")
    _assert_upload_works(server.port)


def test_generic_app_runs_as_the_owner_of_its_root(
    server_factory, accounts: Accounts, apps: Path
) -> None:
    server = server_factory(
        apps / "owned" / "generic_app", "--app-start-command", "python3 server.py"
    )
    (proc,) = server.app_processes()
    _assert_runs_as(proc, accounts.owner.uid, accounts.owner.gid)
    assert json.loads(get(server.port, "/").body)["pid"] == proc.pid
    _assert_upload_works(server.port)


def test_root_owned_app_runs_as_nobody(server_factory, apps: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    server = server_factory(apps / "root" / "wsgi_echo")
    for proc in server.app_processes() + [psutil.Process(p) for p in server.preloader_pids()]:
        _assert_runs_as(proc, nobody.pw_uid, nobody.pw_gid)
        assert proc.username() == "nobody"
    pid = _serving_pid(server)
    assert psutil.Process(pid).gids().effective == nobody.pw_gid  # nogroup on Debian
    server.wait_for_log("spawned for app wsgi_echo as user nobody")
    _assert_upload_works(server.port)


def test_root_owned_generic_app_runs_as_nobody(server_factory, apps: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    server = server_factory(
        apps / "root" / "generic_app", "--app-start-command", "python3 server.py"
    )
    (proc,) = server.app_processes()
    _assert_runs_as(proc, nobody.pw_uid, nobody.pw_gid)


def test_user_and_group_options_override_the_owner(
    server_factory, accounts: Accounts, apps: Path
) -> None:
    other = accounts.other
    server = server_factory(apps / "owned" / "wsgi_echo", "--user", other.name)
    _assert_runs_as(psutil.Process(_serving_pid(server)), other.uid, other.gid)
    server = server_factory(
        apps / "root" / "wsgi_echo", "--user", other.name, "--group", accounts.extra_group
    )
    proc = psutil.Process(_serving_pid(server))
    _assert_runs_as(proc, other.uid, accounts.extra_gid)
    assert proc.environ()["USER"] == other.name
    server = server_factory(apps / "owned" / "wsgi_echo", "--group", accounts.extra_group)
    _assert_runs_as(psutil.Process(_serving_pid(server)), accounts.owner.uid, accounts.extra_gid)


def test_a_passengerfile_cannot_choose_the_user(
    server_factory, accounts: Accounts, apps: Path
) -> None:
    """The app's owner writes its Passengerfile.json: naming another user there has no effect."""
    app = apps / "owned" / "wsgi_echo"
    passengerfile = app / "Passengerfile.json"
    passengerfile.write_text(json.dumps({"user": accounts.other.name, "group": "root"}))
    try:
        server = server_factory(app)
        _assert_runs_as(
            psutil.Process(_serving_pid(server)), accounts.owner.uid, accounts.owner.gid
        )
    finally:
        passengerfile.unlink()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--user", "no-such-user-am"), "invalid value for --user: user 'no-such-user-am' does"),
        (("--group", "no-such-group-am"), "invalid value for --group: group 'no-such-group-am'"),
        (("--user", "root"), "invalid value for --user: apps never run as root"),
    ],
)
def test_bad_user_or_group_is_rejected_at_start(
    tmp_path: Path, apps: Path, args: tuple[str, ...], message: str
) -> None:
    server = start_server(apps / "root" / "wsgi_echo", *args, tmp_path=tmp_path, wait=False)
    out, _ = server.proc.communicate(timeout=30)
    assert server.proc.returncode != 0
    assert message in out


def test_non_root_core_refuses_another_user(accounts: Accounts, apps: Path) -> None:
    """A core that is not root switches nothing, and says so when asked to."""
    script = (
        "from appmanager import settings\n"
        "try:\n"
        f"    settings.parse_all({{'user': {accounts.other.name!r}}})\n"
        "except settings.SettingError as exc:\n"
        "    print(exc)\n"
        f"settings.parse_all({{'user': {accounts.owner.name!r}}})\n"
    )
    result = subprocess.run(
        ["su", "-s", "/bin/sh", "-c", f'{sys.executable} -c "$0"', accounts.owner.name, script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert "invalid value for --user: --user needs appmanager to run as root" in result.stdout


def test_app_cannot_write_the_instance_directory(
    server_factory, accounts: Accounts, apps: Path
) -> None:
    server = server_factory(apps / "owned" / "wsgi_echo")
    instance = server.instance_dir
    info = instance.stat()
    assert info.st_uid == 0 and info.st_mode & 0o777 == 0o700
    for target in (instance / "intruder", instance / "spool" / "intruder"):
        result = subprocess.run(
            ["su", "-s", "/bin/sh", "-c", f"touch {target}", accounts.owner.name],
            capture_output=True,
            text=True,
        )
        assert result.returncode != 0
        assert not target.exists()
    # Bodies spooled there still reach the app: they are passed as descriptors.
    _assert_upload_works(server.port)
