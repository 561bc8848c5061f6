"""Config files, Passengerfile.json and mass deployment turned into apps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appmanager.config import ConfigError, build

APPS = Path(__file__).resolve().parent.parent / "apps"


def cli(**values: object) -> dict[str, object]:
    return {k: v for k, v in values.items()}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_single_app_from_the_directory() -> None:
    plan = build(str(APPS / "wsgi_echo"), cli(port="4000", min_instances="2"))
    assert plan.settings["port"] == 4000
    (app,) = plan.apps
    assert app.spec.app_type == "python"
    assert app.settings["min_instances"] == 2
    assert app.server_names == () and app.base_uri == ""


def test_config_file_with_two_apps(tmp_path: Path) -> None:
    conf = write(
        tmp_path / "appmanager.toml",
        f"""
port = 4100
max_pool_size = 4

[[app]]
root = "{APPS / "wsgi_echo"}"
server_names = ["echo.test", "www.echo.test"]
min_instances = 2
env_var = {{ GREETING = "hi" }}

[[app]]
root = "{APPS / "flask_app"}"
startup_file = "app.py"
base_uri = "/flask/"
environment = "development"
""",
    )
    plan = build(None, cli(config=str(conf)))
    assert plan.settings["port"] == 4100 and plan.settings["max_pool_size"] == 4
    echo, flask = plan.apps
    assert echo.server_names == ("echo.test", "www.echo.test")
    assert echo.settings["min_instances"] == 2
    assert echo.settings["env_var"] == {"GREETING": "hi"}
    assert flask.base_uri == "/flask"
    assert flask.settings["environment"] == "development"
    assert flask.settings["min_instances"] == 1


def test_cli_overrides_the_config_file(tmp_path: Path) -> None:
    conf = write(tmp_path / "a.toml", f'port = 4100\n[[app]]\nroot = "{APPS / "wsgi_echo"}"\n')
    plan = build(None, cli(config=str(conf), port="4200"))
    assert plan.settings["port"] == 4200


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('colour = "blue"\n[[app]]\nroot = "."\n', "a.toml:1: unknown key 'colour'"),
        ('[[app]]\nroot = "R"\n\nmin_instance = 3\n', "a.toml:4: unknown key 'min_instance'"),
        ('[[app]]\nroot = "R"\nport = 3\n', "a.toml:3: 'port' is a global setting"),
        (
            '[[app]]\nroot = "R"\nmin_instances = -2\n',
            "a.toml:3: min_instances: must be at least 0",
        ),
        ('[[app]]\nroot = "R"\n[[app]]\nmin_instances = 1\n', "a.toml:3: [[app]] without root"),
        ("port = 4000\n", "no [[app]] tables"),
        ("port = \n", "a.toml: Invalid value"),
        ('[[app]]\nroot = "R"\nbase_uri = "sub"\n', "base_uri: must be a path starting with /"),
    ],
)
def test_bad_config_files_name_file_key_and_line(tmp_path: Path, text: str, message: str) -> None:
    conf = write(tmp_path / "a.toml", text.replace('"R"', f'"{APPS / "wsgi_echo"}"'))
    with pytest.raises(ConfigError) as info:
        build(None, cli(config=str(conf)))
    assert message in str(info.value)


def test_missing_app_in_config_names_the_line(tmp_path: Path) -> None:
    conf = write(tmp_path / "a.toml", f'[[app]]\nroot = "{tmp_path}"\n')
    with pytest.raises(ConfigError, match=r"a.toml:2: no app found"):
        build(None, cli(config=str(conf)))


def test_passengerfile_json_is_read(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "passenger_wsgi.py").write_text("application = None\n")
    (app / "Passengerfile.json").write_text(
        json.dumps(
            {
                "environment": "staging",
                "min_instances": 3,
                "envvars": {"A": "1"},
                "port": 4300,
                "friendly_error_pages": True,
            }
        )
    )
    plan = build(str(app), cli())
    assert plan.settings["port"] == 4300
    (only,) = plan.apps
    assert only.settings["environment"] == "staging"
    assert only.settings["min_instances"] == 3
    assert only.settings["env_var"] == {"A": "1"}
    # CLI still wins.
    assert build(str(app), cli(environment="production")).apps[0].settings["environment"] == (
        "production"
    )


def test_bad_passengerfile_value(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "passenger_wsgi.py").write_text("application = None\n")
    (app / "Passengerfile.json").write_text('{"min_instances": "many"}')
    with pytest.raises(ConfigError, match="Passengerfile.json: min_instances: must be an integer"):
        build(str(app), cli())


def test_mass_deployment(tmp_path: Path) -> None:
    for name in ("alpha", "beta"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "passenger_wsgi.py").write_text("application = None\n")
    (tmp_path / "not-an-app").mkdir()
    plan = build(str(tmp_path), cli())
    assert plan.mass_deployment
    assert [(a.name, a.server_names) for a in plan.apps] == [
        ("alpha", ("alpha",)),
        ("beta", ("beta",)),
    ]


def test_no_app_and_no_subdirectory_apps(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no app found"):
        build(str(tmp_path), cli())


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (("A=1", "B=x=y"), {"A": "1", "B": "x=y"}),
        (("EMPTY=",), {"EMPTY": ""}),
    ],
)
def test_env_var_option(values: tuple[str, ...], expected: dict[str, str]) -> None:
    plan = build(str(APPS / "wsgi_echo"), cli(env_var=values))
    assert plan.apps[0].settings["env_var"] == expected


def test_env_var_without_equals_is_rejected() -> None:
    from appmanager.settings import SettingError

    with pytest.raises(SettingError, match="--env-var: expected NAME=VALUE"):
        build(str(APPS / "wsgi_echo"), cli(env_var=("NOVALUE",)))


def test_detects_each_language(tmp_path: Path) -> None:
    cases = {
        "rack": ("config.ru", "run ->(env) { [200, {}, ['x']] }\n"),
        "node": ("app.js", "require('http').createServer().listen(3000)\n"),
        "python": ("wsgi.py", "application = None\n"),
    }
    for kind, (filename, text) in cases.items():
        root = tmp_path / kind
        root.mkdir()
        (root / filename).write_text(text)
        assert build(str(root), cli()).apps[0].spec.app_type == kind
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "package.json").write_text('{"main": "lib/start.js"}')
    (pkg / "lib").mkdir()
    (pkg / "lib" / "start.js").write_text("")
    spec = build(str(pkg), cli()).apps[0].spec
    assert spec.app_type == "node" and spec.startup_file.endswith("lib/start.js")
    generic = build(str(tmp_path / "pkg"), cli(app_start_command="./run --fast")).apps[0].spec
    assert generic.app_type == "generic" and generic.command == "./run --fast"


def test_passengerfile_cannot_name_files_or_users(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "passenger_wsgi.py").write_text("application = None\n")
    (app / "Passengerfile.json").write_text(
        json.dumps({"custom_error_page": "/etc/shadow", "user": "root", "environment": "staging"})
    )
    (only,) = build(str(app), cli()).apps
    assert only.settings["custom_error_page"] is None
    assert only.settings["user"] is None
    assert only.settings["environment"] == "staging"
