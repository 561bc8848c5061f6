"""The settings registry: parsing, validation messages, and the generated docs."""

from __future__ import annotations

import pytest

from appmanager import connectorgen, docgen, settings


def test_defaults_match_the_documented_ones() -> None:
    d = settings.defaults()
    assert d["address"] == "127.0.0.1"
    assert d["port"] == 3000
    assert d["min_instances"] == 1
    assert d["max_pool_size"] == 6
    assert d["max_request_queue_size"] == 100
    assert d["environment"] == "production"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("port", "0", "--port: must be between 1 and 65535"),
        ("port", "http", "--port: must be an integer"),
        ("max_pool_size", "0", "--max-pool-size: must be at least 1"),
        ("min_instances", "-1", "--min-instances: must be at least 0"),
        ("max_request_queue_size", "many", "--max-request-queue-size: must be an integer"),
        ("log_level", "loud", "--log-level: must be one of"),
        ("log_file", "/nonexistent-dir/x.log", "--log-file: directory /nonexistent-dir"),
    ],
)
def test_bad_values_name_the_option(name: str, value: str, message: str) -> None:
    with pytest.raises(settings.SettingError) as info:
        settings.parse_all({name: value})
    assert message in str(info.value)


def test_unknown_setting_rejected() -> None:
    with pytest.raises(settings.SettingError, match="no such setting"):
        settings.parse_all({"max_pool": 3})


def test_every_setting_is_documented_and_unique() -> None:
    names = [s.name for s in settings.SETTINGS]
    assert len(names) == len(set(names))
    for s in settings.SETTINGS:
        assert s.doc.strip(), s.name
        if s.default is not None:
            assert s.parse(s.default) == s.default, s.name


def test_generated_settings_doc_is_current() -> None:
    committed = docgen.DOC_PATH.read_text()
    assert committed == docgen.render(), "run `python -m appmanager.docgen` and commit the result"


def test_connector_directive_table_is_generated_from_the_registry() -> None:
    committed = connectorgen.DEF_PATH.read_text()
    assert committed == connectorgen.render(), "run `python -m appmanager.docgen` and commit it"


def test_every_app_setting_has_nginx_and_apache_directives_with_passenger_aliases() -> None:
    table = connectorgen.render()
    for setting in settings.SETTINGS:
        if setting.scope is not settings.Scope.APP or setting.connector_role == "none":
            continue
        for name in connectorgen.nginx_names(setting) + connectorgen.apache_names(setting):
            assert f'"{name}"' in table
    assert '"passenger_app_env"' in table and '"PassengerAppEnv"' in table
    assert '"PassengerBaseURI"' in table
