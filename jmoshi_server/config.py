"""All settings in one place: a dataclass whose fields become CLI flags with JMOSHI_* twins.

Each field declares its flag help once; `parse_config` builds the argparse parser from the
fields, and every flag's default comes from the environment variable of the same name
(``--max-message-bytes`` <-> ``JMOSHI_MAX_MESSAGE_BYTES``). Precedence: flag > env > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "JMOSHI_"
DEFAULT_HF_REPO = "nu-dialogue/j-moshi-ext"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _opt(help_text: str, default: Any = None, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass(frozen=True)
class Config:
    """Server settings. Field names map to ``--flag-name`` and ``JMOSHI_FLAG_NAME``."""

    host: str = _opt("Address to bind (0.0.0.0 to serve the LAN).", "127.0.0.1")
    port: int = _opt("TCP port.", 8998)
    hf_repo: str = _opt("Hugging Face repo with the J-Moshi weights.", DEFAULT_HF_REPO)
    model_dir: Path | None = _opt(
        "Load model.safetensors, the Mimi and tokenizer files (and an optional config.json) "
        "from this directory instead of the hub; no network is used."
    )
    demo: bool = _opt(
        "Serve a tiny randomly-initialised checkpoint (built once, cached). Its speech is noise "
        "and its text random: for trying the server and for tests on any machine.",
        False,
    )
    demo_dir: Path | None = _opt(
        "Where the demo checkpoint is built and cached (default: the user cache dir)."
    )
    device: str | None = _opt("Torch device: cuda, cuda:N or cpu (default: cuda; cpu with --demo).")
    dtype: str | None = _opt(
        "Weights dtype: bfloat16, float16 or float32 (default: bfloat16 on cuda, float32 on cpu).",
        choices=("bfloat16", "float16", "float32"),
    )
    warmup_frames: int = _opt("Frames run at start-up so CUDA graphs are captured before users.", 4)
    text_temperature: float = _opt("Default text sampling temperature (0 = greedy).", 0.7)
    text_topk: int = _opt("Default text top-k.", 25)
    audio_temperature: float = _opt("Default audio sampling temperature (0 = greedy).", 0.8)
    audio_topk: int = _opt("Default audio top-k.", 250)
    seed: int | None = _opt("Default random seed per session (unset: a fresh seed each session).")
    input_budget_ms: int = _opt(
        "Most audio queued for the model; older input beyond it is dropped so latency stays bounded.",
        240,
    )
    stats_interval_seconds: float = _opt(
        "How often a session gets a stats message (kind 0x08: step times, drops, real time or not; "
        "docs/protocol-stats.md). 0 = never.",
        1.0,
    )
    torch_threads: int = _opt(
        "CPU threads torch may use for the model (0 = auto: one fewer than the cores, at least 1, "
        "so the event loop and Opus keep a core; see docs/benchmarks.md).",
        0,
    )
    cpu_split: bool = _opt(
        "Pin the event loop to one CPU and the model thread (with torch's threads) to the others, "
        "so the loop never waits behind the model for a time slice (Linux, 2+ CPUs). Off by "
        "default: on the 2-core dev VM it helped GET latency and hurt the audio path "
        "(docs/benchmarks.md); measure on your machine.",
        False,
    )
    gc_freeze: bool = _opt(
        "Once the model is warm, move every object alive then out of the garbage collector's "
        "reach (gc.freeze). torch and the model leave ~260 000 objects behind; a full collection "
        "over them stalls both the event loop and the model for ~100 ms (docs/benchmarks.md).",
        True,
    )
    bench_step_delay_ms: float = _opt(
        "Benchmarks only: sleep this long in every model step, to imitate a GPU too slow for real "
        "time (bench/slow_model.py). Never set it for real use.",
        0.0,
    )
    bench_trace_dir: Path | None = _opt(
        "Benchmarks only: when a session ends, write its per-frame timestamps here as JSON lines "
        "(bench/vs_moshi_server.py)."
    )
    max_message_bytes: int = _opt("Largest WebSocket message accepted.", 1 << 20)
    max_session_seconds: int = _opt("End a session after this long (0 = unlimited).", 600)
    idle_seconds: int = _opt(
        "End a session when no audio has arrived for this long, freeing the model (0 = never).", 60
    )
    heartbeat_seconds: float = _opt(
        "WebSocket ping interval; a client silent for half of it is dropped.", 5.0
    )
    recording: bool = _opt(
        "Allow sessions to ask to be recorded (query record=1); recording is always opt-in per session.",
        True,
    )
    recordings_dir: Path | None = _opt(
        "Where recordings are kept (default: the data dir's recordings/ folder)."
    )
    recordings_keep_days: float = _opt("Delete recordings older than this many days (0 = no age limit).", 7.0)
    recordings_max_mb: int = _opt(
        "Disk cap for all recordings in MiB; the oldest are deleted first (0 = no cap).", 2048
    )
    static_dir: Path | None = _opt("Directory served at / (default: the bundled page).")
    data_dir: Path | None = _opt(
        "Where the server keeps its own files, e.g. the generated TLS certificate "
        "(default: ~/.local/share/jmoshi-server)."
    )
    tls: str = _opt(
        "HTTPS: auto = on unless --host is a loopback address; off behind a TLS proxy. Browsers "
        "give the microphone only to https pages (and http://localhost).",
        "auto",
        choices=("auto", "on", "off"),
    )
    tls_cert: Path | None = _opt(
        "Certificate (PEM, full chain) to serve instead of the generated self-signed one, e.g. from mkcert."
    )
    tls_key: Path | None = _opt("Private key (PEM) for --tls-cert.")
    public_hosts: str | None = _opt(
        "Comma-separated names or addresses people open (e.g. 192.168.1.20,gpu-box.local): added to "
        "the generated certificate and the printed URLs. Needed in a container, which cannot see "
        "the host's addresses."
    )
    token: str | None = field(
        default=None,
        repr=False,
        metadata={
            "help": "Require this shared secret on every request (Bearer header, the cookie the page "
            "sets after it is typed once, or ?token=); unset = anyone who can reach the port."
        },
    )
    allowed_origins: str | None = _opt(
        "Comma-separated extra origins (scheme://host[:port]) whose pages may open the chat socket; "
        "the server's own origin is always allowed."
    )
    log_level: str = _opt("Log level.", "info", choices=("debug", "info", "warning", "error"))

    @property
    def resolved_device(self) -> str:
        return self.device or ("cpu" if self.demo else "cuda")

    @property
    def resolved_recordings_dir(self) -> Path:
        """Recordings live in the data dir unless placed elsewhere (the container's /data volume)."""
        return self.recordings_dir or self.resolved_data_dir / "recordings"

    @property
    def resolved_dtype(self) -> str:
        if self.dtype:
            return self.dtype
        return "float32" if self.resolved_device == "cpu" else "bfloat16"

    @property
    def resolved_data_dir(self) -> Path:
        if self.data_dir:
            return self.data_dir
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
        return base / "jmoshi-server"

    @property
    def public_host_list(self) -> list[str]:
        return _split_list(self.public_hosts)

    @property
    def allowed_origin_list(self) -> list[str]:
        return [origin.rstrip("/").lower() for origin in _split_list(self.allowed_origins)]

    @property
    def frame_budget(self) -> int:
        """Input frames (80 ms each) that may wait for the model before the oldest is dropped."""
        return max(1, round(self.input_budget_ms / 80))


def _split_list(raw: str | None) -> list[str]:
    return [item.strip() for item in (raw or "").split(",") if item.strip()]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _field_type(f: dataclasses.Field) -> str:
    """The base type name of a field ("int", "Path", ...), ignoring ``| None``."""
    return str(f.type).replace(" | None", "").strip()


def _convert(f: dataclasses.Field, raw: str) -> Any:
    kind = _field_type(f)
    if kind == "bool":
        value = raw.strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "Path":
        return Path(raw).expanduser()
    return raw


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """An argparse parser whose defaults come from ``env`` (``os.environ`` when None)."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="jmoshi-server",
        description="Real-time Japanese voice chat with J-Moshi. Every flag has a JMOSHI_* env twin.",
    )
    for f in dataclasses.fields(Config):
        default = f.default
        var = env_name(f.name)
        # An empty value (``JMOSHI_TOKEN=`` in an env file) means "not set", as in compose files.
        if env.get(var, "") != "":
            try:
                default = _convert(f, env[var])
            except ValueError as exc:
                parser.error(f"{var}={env[var]!r}: {exc}")
        help_text = f"{f.metadata['help']} [env {var}]"
        if _field_type(f) == "bool":
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                default=default,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
            continue
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            default=default,
            type=lambda raw, f=f: _convert(f, raw),
            choices=f.metadata.get("choices"),
            help=help_text,
        )
    return parser


def _choice_problems(config: Config) -> list[str]:
    """argparse checks choices on the command line only, not on defaults taken from JMOSHI_*."""
    problems = []
    for f in dataclasses.fields(Config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value is not None and value not in choices:
            problems.append(f"{flag_name(f.name)} {value!r}: choose from {', '.join(choices)}")
    return problems


def _access_problems(config: Config) -> list[str]:
    """HTTPS, token and origin settings."""
    problems = []
    if bool(config.tls_cert) != bool(config.tls_key):
        problems.append("--tls-cert and --tls-key go together")
    if config.tls_cert and config.tls == "off":
        problems.append("--tls-cert was given with --tls off")
    for path in (config.tls_cert, config.tls_key):
        if path and not path.is_file():
            problems.append(f"{path} does not exist")
    if config.token is not None and not config.token.strip():
        problems.append("--token must not be blank")
    for origin in config.allowed_origin_list:
        scheme, sep, rest = origin.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
            problems.append(f"--allowed-origins: {origin!r} is not scheme://host[:port]")
    return problems


def validate(config: Config) -> list[str]:
    """Human-readable problems with a config (empty when it is usable)."""
    problems = [*_choice_problems(config), *_access_problems(config)]
    if not 0 < config.port < 65536:
        problems.append(f"--port {config.port} is not a TCP port")
    if config.demo and config.model_dir:
        problems.append("--demo and --model-dir exclude each other")
    if config.max_message_bytes < 1024:
        problems.append("--max-message-bytes must be at least 1024")
    if config.input_budget_ms < 80:
        problems.append("--input-budget-ms must be at least one frame (80)")
    if config.stats_interval_seconds < 0 or config.bench_step_delay_ms < 0 or config.torch_threads < 0:
        problems.append("--stats-interval-seconds, --torch-threads and --bench-step-delay-ms must be >= 0")
    if config.max_session_seconds < 0:
        problems.append("--max-session-seconds must be >= 0")
    if config.idle_seconds < 0:
        problems.append("--idle-seconds must be >= 0")
    if config.heartbeat_seconds <= 0:
        problems.append("--heartbeat-seconds must be > 0")
    if config.recordings_keep_days < 0 or config.recordings_max_mb < 0:
        problems.append("--recordings-keep-days and --recordings-max-mb must be >= 0")
    if config.text_temperature < 0 or config.audio_temperature < 0:
        problems.append("temperatures must be >= 0")
    if config.text_topk < 1 or config.audio_topk < 1:
        problems.append("top-k values must be >= 1")
    return problems


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    parser = build_parser(env)
    args = parser.parse_args(argv)
    config = Config(**vars(args))
    problems = validate(config)
    if problems:
        parser.error("; ".join(problems))
    return config
