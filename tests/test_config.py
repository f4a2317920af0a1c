"""Flags, their JMOSHI_* twins, precedence and validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from jmoshi_server.config import Config, build_parser, env_name, flag_name, parse_config


def test_defaults_without_flags_or_env():
    config = parse_config([], env={})
    assert config.host == "127.0.0.1"
    assert config.port == 8998
    assert config.hf_repo == "nu-dialogue/j-moshi-ext"
    assert config.demo is False and config.model_dir is None
    assert config.resolved_device == "cuda" and config.resolved_dtype == "bfloat16"
    assert config.max_message_bytes == 1 << 20
    assert config.frame_budget == 3  # 240 ms


def test_demo_defaults_to_cpu_float32():
    config = parse_config(["--demo"], env={})
    assert (config.resolved_device, config.resolved_dtype) == ("cpu", "float32")


def test_every_field_has_a_flag_and_an_env_twin():
    parser = build_parser({})
    options = {opt for action in parser._actions for opt in action.option_strings}
    for field in dataclasses.fields(Config):
        assert flag_name(field.name) in options
        assert env_name(field.name) in parser.format_help()


def test_env_twins_are_read_and_typed():
    env = {
        "JMOSHI_PORT": "9000",
        "JMOSHI_DEMO": "yes",
        "JMOSHI_MODEL_DIR": "",
        "JMOSHI_TEXT_TEMPERATURE": "0.25",
        "JMOSHI_HF_REPO": "nu-dialogue/j-moshi",
        "JMOSHI_SEED": "7",
        "JMOSHI_LOG_LEVEL": "debug",
        "JMOSHI_DEMO_DIR": "~/x",
    }
    env.pop("JMOSHI_MODEL_DIR")
    config = parse_config([], env=env)
    assert config.port == 9000 and config.demo is True
    assert config.text_temperature == 0.25 and config.seed == 7
    assert config.hf_repo == "nu-dialogue/j-moshi" and config.log_level == "debug"
    assert config.demo_dir == Path("~/x").expanduser()


def test_flags_beat_env():
    config = parse_config(["--port", "9100", "--no-demo"], env={"JMOSHI_PORT": "9000", "JMOSHI_DEMO": "1"})
    assert config.port == 9100 and config.demo is False


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        ([], {"JMOSHI_PORT": "eighty"}, "JMOSHI_PORT"),
        ([], {"JMOSHI_DEMO": "maybe"}, "JMOSHI_DEMO"),
        (["--port", "70000"], {}, "--port"),
        (["--demo", "--model-dir", "/tmp"], {}, "exclude"),
        (["--dtype", "int4"], {}, "dtype"),
        (["--input-budget-ms", "10"], {}, "input-budget-ms"),
        (["--text-topk", "0"], {}, "top-k"),
    ],
)
def test_bad_settings_exit_with_a_message(argv, env, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv, env=env)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_recordings_live_in_the_data_dir_unless_placed_elsewhere(tmp_path):
    config = parse_config(["--data-dir", str(tmp_path)], env={})
    assert config.resolved_recordings_dir == tmp_path / "recordings"
    assert config.resolved_data_dir / "tls" != config.resolved_recordings_dir
    elsewhere = parse_config([], env={"JMOSHI_DATA_DIR": str(tmp_path), "JMOSHI_RECORDINGS_DIR": "/srv/rec"})
    assert elsewhere.resolved_recordings_dir == Path("/srv/rec")
