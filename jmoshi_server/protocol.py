"""The moshi wire protocol: message kinds, error codes, and the per-session query parameters.

Every WebSocket message is binary; its first byte is the kind (the numbering Kyutai's web
client defines in ``client/src/protocol/types.ts``), the rest is the payload.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from .config import Config


class Kind(enum.IntEnum):
    HANDSHAKE = 0x00  # server -> client, once the session holds the model and is ready
    AUDIO = 0x01  # both ways: Ogg/Opus pages, 24 kHz mono
    TEXT = 0x02  # server -> client: UTF-8 text, complete characters only
    CONTROL = 0x03  # client -> server in Kyutai's client; accepted and ignored here
    METADATA = 0x04  # server -> client: UTF-8 JSON, right after the handshake
    ERROR = 0x05  # server -> client: UTF-8 JSON {"code": ..., "message": ...}
    PING = 0x06  # client -> server keep-alive in Kyutai's client; ignored
    COLORED_TEXT = 0x07  # not sent by this server
    # Ours, after Kyutai's kinds; their client skips unknown kinds. docs/protocol-stats.md.
    STATS = 0x08  # server -> client: UTF-8 JSON about once a second (step times, drops, realtime)


# Kinds a real moshi client may send that carry nothing for us: accepted silently.
IGNORED_CLIENT_KINDS = frozenset({Kind.CONTROL, Kind.PING})


class ErrorCode(enum.StrEnum):
    BUSY = "busy"
    BAD_PARAMETER = "bad_parameter"
    BAD_AUDIO = "bad_audio"
    UNKNOWN_KIND = "unknown_kind"
    EMPTY_MESSAGE = "empty_message"
    TEXT_FRAME = "text_frame"
    MESSAGE_TOO_LARGE = "message_too_large"
    SESSION_LIMIT = "session_limit"
    IDLE_TIMEOUT = "idle_timeout"
    UNAUTHORIZED = "unauthorized"
    SLOW_CONSUMER = "slow_consumer"
    NOT_READY = "not_ready"
    INTERNAL = "internal_error"
    SHUTTING_DOWN = "shutting_down"


def encode(kind: Kind, payload: bytes = b"") -> bytes:
    return bytes((kind,)) + payload


def encode_json(kind: Kind, obj: Mapping) -> bytes:
    return encode(kind, json.dumps(obj, ensure_ascii=False).encode("utf-8"))


def encode_error(code: ErrorCode, message: str, **extra: object) -> bytes:
    return encode_json(Kind.ERROR, {"code": str(code), "message": message, **extra})


class ParameterError(ValueError):
    """A query parameter that cannot be honoured; its message names the parameter."""


@dataclass(frozen=True)
class Sampling:
    """Sampling settings in force for one session."""

    text_temperature: float
    text_topk: int
    audio_temperature: float
    audio_topk: int
    seed: int | None

    @classmethod
    def defaults(cls, config: Config) -> Sampling:
        return cls(
            config.text_temperature,
            config.text_topk,
            config.audio_temperature,
            config.audio_topk,
            config.seed,
        )

    def to_json(self) -> dict:
        return asdict(self)


# name -> (type, lowest, highest) for every query parameter we honour.
_LIMITS: dict[str, tuple[type, float, float]] = {
    "text_temperature": (float, 0.0, 5.0),
    "text_topk": (int, 1, 100_000),
    "audio_temperature": (float, 0.0, 5.0),
    "audio_topk": (int, 1, 100_000),
    "seed": (int, 0, 2**63 - 1),
}


def parse_sampling(query: Mapping[str, str], defaults: Sampling) -> Sampling:
    """Sampling settings from a chat URL's query; unknown parameters are ignored.

    Kyutai's web client also sends ``pad_mult``, ``repetition_penalty`` etc.; moshi's
    Python server does not implement them and neither do we, so they are ignored rather
    than refused. Raises ParameterError for a known parameter with a bad value.
    """
    values = asdict(defaults)
    for name, (kind, low, high) in _LIMITS.items():
        raw = query.get(name)
        if raw is None or raw == "":
            continue
        try:
            value = kind(raw)
        except ValueError:
            raise ParameterError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
        if math.isnan(value) or not low <= value <= high:
            raise ParameterError(f"{name}={raw!r} is outside {low}..{high}")
        values[name] = value
    return Sampling(**values)
