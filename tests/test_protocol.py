"""Message encoding and query-parameter validation."""

from __future__ import annotations

import json

import pytest

from jmoshi_server import protocol
from jmoshi_server.config import parse_config
from jmoshi_server.protocol import ErrorCode, Kind, ParameterError, Sampling, parse_sampling

DEFAULTS = Sampling.defaults(parse_config([], env={}))


def test_kinds_match_the_moshi_client_numbering():
    assert list(range(7)) == [
        Kind.HANDSHAKE,
        Kind.AUDIO,
        Kind.TEXT,
        Kind.CONTROL,
        Kind.METADATA,
        Kind.ERROR,
        Kind.PING,
    ]


def test_error_message_is_json_with_code_and_message():
    raw = protocol.encode_error(ErrorCode.BUSY, "使用中です", session_seconds=3.5)
    assert raw[0] == 0x05
    assert json.loads(raw[1:].decode("utf-8")) == {
        "code": "busy",
        "message": "使用中です",
        "session_seconds": 3.5,
    }


def test_defaults_when_no_parameters():
    assert parse_sampling({}, DEFAULTS) == DEFAULTS


def test_known_parameters_override_and_unknown_are_ignored():
    got = parse_sampling(
        {
            "text_temperature": "0.3",
            "audio_topk": "100",
            "seed": "5",
            "pad_mult": "2",
            "repetition_penalty": "1.1",
        },
        DEFAULTS,
    )
    assert (got.text_temperature, got.audio_topk, got.seed) == (0.3, 100, 5)
    assert got.text_topk == DEFAULTS.text_topk


@pytest.mark.parametrize(
    "query",
    [
        {"text_temperature": "x"},
        {"text_temperature": "inf"},
        {"audio_temperature": "-0.1"},
        {"text_topk": "2.5"},
        {"audio_topk": "0"},
        {"seed": "abc"},
    ],
)
def test_bad_values_name_the_parameter(query):
    with pytest.raises(ParameterError, match=next(iter(query))):
        parse_sampling(query, DEFAULTS)
