"""The configuration: the example file is complete and valid; bad files stop start-up clearly."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from engine.contract.config import (ArcaeConfig, ConfigError, Secrets, load_command_config, load_config, locate_config,
                                    parse_config)

REPO = Path(__file__).resolve().parents[3]


def test_example_config_is_complete_and_valid():
    cfg = load_config(REPO / "config.toml")
    assert cfg.generation.size == (832, 1216)
    assert cfg.model.source.startswith("cagliostrolab/animagine-xl-3")
    # Every key of every section appears in the example file (it documents them all).
    text = (REPO / "config.toml").read_text(encoding="utf-8")
    for section, model in ArcaeConfig.model_fields.items():
        if section == "base_dir":
            continue
        assert f"[{section}]" in text, section
        for key in model.annotation.model_fields:
            assert f"\n{key} =" in text, f"[{section}] {key} missing from config.toml"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"generation": {"steps": 500}}, ["[generation] steps = 500", "less than or equal to 150"]),
        ({"generation": {"stepz": 5}}, ["unknown key [generation] stepz", "allowed keys here", "steps"]),
        ({"engine": {"mode": "cluster"}}, ["[engine] mode = 'cluster'", "'local', 'remote' or 'redis'"]),
        ({"engine": {"port": "eighty"}}, ["[engine] port = 'eighty'", "integer"]),
        ({"generation": {"size": "big"}}, ["[generation] size", "1024x1024"]),
        ({"nonsense": {}}, ["unknown key nonsense", "discord"]),
        ({"gallery": {"promote_at": -1}}, ["[gallery] promote_at = -1", "greater than or equal to 0"]),
        ({"gallery": {"channel_id": 5, "promote_to": 5}}, ["promote_to = 5 is the gallery channel", "0 to pin"]),
        ({"training": {"status_edit_interval_s": 0.1}}, ["[training] status_edit_interval_s = 0.1",
                                                          "greater than or equal to 1"]),
        ({"engine": {"lora_execution": "merged"}}, ["[engine] lora_execution = 'merged'", "'fused' or 'unfused'"]),
        ({"engine": {"compile": "max"}}, ["[engine] compile = 'max'", "'off', 'default' or 'max-autotune'"]),
    ],
)
def test_bad_values_name_key_value_and_rule(data, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    for fragment in expected:
        assert fragment in str(info.value)


def test_config_is_frozen():
    cfg = parse_config({})
    with pytest.raises(Exception):
        cfg.generation.steps = 3  # type: ignore[misc]


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "c.toml").write_text('[storage]\ndatabase = "db/x.sqlite3"\n', encoding="utf-8")
    cfg = load_config(tmp_path / "c.toml")
    assert cfg.path(cfg.storage.database) == tmp_path / "db" / "x.sqlite3"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[generation\nsteps=", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_path_from_flag_then_environment_then_working_directory_else_defaults(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ARCAE_CONFIG", str(tmp_path / "env.toml"))
    assert locate_config(None) == tmp_path / "env.toml"
    assert locate_config(tmp_path / "flag.toml") == tmp_path / "flag.toml"
    monkeypatch.delenv("ARCAE_CONFIG")
    assert locate_config(None) is None  # no ./config.toml: the documented defaults
    assert load_command_config(None) == parse_config({}, base_dir=tmp_path)
    (tmp_path / "config.toml").write_text("[generation]\nsteps = 12\n", encoding="utf-8")
    assert locate_config(None) == Path("config.toml")
    assert load_command_config(None).generation.steps == 12


@pytest.mark.parametrize("program, argv", [
    ("engine", ["generate", "1girl"]),
    ("training", ["train"]),
    ("bot", []),
])
def test_every_command_follows_the_same_config_rule(program, argv, monkeypatch, tmp_path, capsys):
    # A file named by $ARCAE_CONFIG must exist, whichever command reads it (`training train` used to
    # ignore the variable and ./config.toml and run on defaults).
    missing = tmp_path / "missing.toml"
    monkeypatch.setenv("ARCAE_CONFIG", str(missing))
    main = {"engine": "engine.cli", "training": "training.cli", "bot": "bot.__main__"}[program]
    assert importlib.import_module(main).main(argv) == 2
    assert f"error: config file not found: {missing}" in capsys.readouterr().err


def test_secrets_come_from_environment_and_never_print():
    cfg = parse_config({})
    secrets = Secrets.from_env(cfg, {"ARCAE_DISCORD_TOKEN": "tok-123-secret", "HF_TOKEN": "hf_abc"})
    assert secrets.discord_token.get_secret_value() == "tok-123-secret"
    shown = repr(secrets) + str(secrets) + secrets.model_dump_json()
    assert "tok-123-secret" not in shown and "hf_abc" not in shown
    assert Secrets.from_env(cfg, {}).discord_token is None


def test_secret_keys_are_not_accepted_in_the_file():
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({"discord": {"token": "abc"}})


def test_negative_cfg_in_a_file_names_file_key_and_rule(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text("[generation]\ncfg = -1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(bad) in str(info.value)
    assert "[generation] cfg = -1" in str(info.value) and "greater than or equal to 0" in str(info.value)


def test_home_servers_default_to_the_synced_guilds_and_refuse_bad_ids():
    assert parse_config({}).discord.home_guilds == frozenset(), "no home server: admin commands are off"
    assert parse_config({"discord": {"guild_ids": [11, 12]}}).discord.home_guilds == {11, 12}
    public = parse_config({"discord": {"guild_ids": [], "home_guild_ids": [11]}})
    assert public.discord.home_guilds == {11}
    with pytest.raises(ConfigError, match=r"home_guild_ids.*positive Discord ids"):
        parse_config({"discord": {"home_guild_ids": [0]}})
