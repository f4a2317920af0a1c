"""The container files, checked statically (no container engine here): compose parsed with yaml,
the Dockerfile read instruction by instruction, both cross-checked against the server's config.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from jmoshi_server.config import Config, build_parser, env_name, parse_config

REPO = Path(__file__).resolve().parent.parent
CONFIG_VARS = {env_name(f.name) for f in dataclasses.fields(Config)}
WEIGHT_FETCHES = ("huggingface-cli", "hf download", "hf_hub_download", "snapshot_download", "from_hf_repo")


# ---- readers --------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, args = (current + stripped).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def instruction_args(name: str) -> list[str]:
    return [args for keyword, args in dockerfile() if keyword == name]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for args in instruction_args("ENV"):
        for pair in args.split():
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not KEY=VALUE"
            pairs[key.strip()] = value.strip()
    return pairs


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def service() -> dict:
    services = compose()["services"]
    assert len(services) == 1, "one service"
    return next(iter(services.values()))


def seconds(duration: str) -> float:
    """Compose/Docker durations: 30s, 90m, 1h30m."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec (JSON) form, not a shell string: {args}"
    return value


def healthcheck_options() -> tuple[dict[str, str], list[str]]:
    (args,) = instruction_args("HEALTHCHECK")
    options = dict(re.findall(r"--([a-z-]+)=(\S+)", args))
    _, _, command = args.partition("CMD")
    return options, exec_form(command.strip())


# ---- compose --------------------------------------------------------------------------------


def test_container_compose_reserves_one_gpu_chosen_by_env() -> None:
    devices = service()["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    (device,) = devices
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "count" not in device, "count and device_ids exclude each other"
    (gpu,) = device["device_ids"]
    match = re.fullmatch(r"\$\{(\w+):-(\d+)\}", gpu)
    assert match, f"the GPU comes from an env variable with a default: {gpu}"
    assert match.group(1) in env_example(), "the GPU variable is documented in .env.example"


def test_container_compose_volumes_hold_the_cache_and_the_data() -> None:
    env = dockerfile_env()
    declared = compose()["volumes"]
    mounts = {}
    for spec in service()["volumes"]:
        source, target = spec.split(":")[:2]
        mounts[target] = source
    for path in (env["HF_HOME"], env["JMOSHI_DATA_DIR"]):
        assert path in mounts, f"{path} is not a volume"
        assert mounts[path] in declared, f"{path} must be a named volume (survives `down`, rebuilds)"
    volume_line = exec_form(instruction_args("VOLUME")[0])
    assert {env["HF_HOME"], env["JMOSHI_DATA_DIR"]} <= set(volume_line)
    # A named volume starts with the image directory's owner: the non-root user must own both.
    chowns = " ".join(args for args in instruction_args("RUN") if "chown" in args)
    assert env["HF_HOME"] in chowns and env["JMOSHI_DATA_DIR"] in chowns


def test_container_compose_runs_like_a_service() -> None:
    svc = service()
    assert svc["restart"] == "unless-stopped"
    assert svc["logging"]["driver"] == "json-file"
    assert {"max-size", "max-file"} <= set(svc["logging"]["options"])
    assert seconds(svc["stop_grace_period"]) >= 10, "the server needs ~5 s to say goodbye to users"
    assert any(str(p).endswith(":${JMOSHI_PORT:-8998}") for p in svc["ports"])


def test_container_healthcheck_waits_for_the_first_download() -> None:
    options, command = healthcheck_options()
    compose_check = service()["healthcheck"]
    assert compose_check["test"] == ["CMD", *command], "compose and the image check the same way"
    assert command[-2:] == ["-m", "jmoshi_server.healthcheck"]
    assert importlib.util.find_spec("jmoshi_server.healthcheck") is not None
    # ~16 GB at 40 Mbit/s is about 55 minutes.
    assert seconds(options["start-period"]) >= 3600
    assert seconds(compose_check["start_period"]) >= 3600


def test_container_env_wiring_reaches_the_server() -> None:
    """Every JMOSHI_* anywhere in the container files is a real setting, and the settings parse."""
    texts = {name: (REPO / name).read_text() for name in ("docker-compose.yml", ".env.example", "Dockerfile")}
    for name, text in texts.items():
        unknown = set(re.findall(r"JMOSHI_[A-Z0-9_]+", text)) - CONFIG_VARS
        assert not unknown, f"{name} names {unknown}, which the server does not read"
    svc = service()
    env_files = [entry["path"] if isinstance(entry, dict) else entry for entry in svc["env_file"]]
    assert ".env" in env_files
    assert "HF_TOKEN" in env_example()
    # compose's `environment:` would silently win over the same variable in .env.
    assert not set(svc.get("environment") or {}) & set(env_example())
    env = {**dockerfile_env(), **env_example()}
    config = parse_config([], env=env)
    assert config.host == "0.0.0.0", "inside the container the server must listen on every interface"
    assert config.port == int(env_example()["JMOSHI_PORT"]) == Config.port
    assert str(config.resolved_data_dir) == dockerfile_env()["JMOSHI_DATA_DIR"]


# ---- Dockerfile -----------------------------------------------------------------------------


def test_container_runs_as_a_non_root_user() -> None:
    users = instruction_args("USER")
    assert users, "no USER: the server would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    keywords = [keyword for keyword, _ in dockerfile()]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")


def test_container_bakes_no_weights() -> None:
    for keyword, args in dockerfile():
        if keyword in ("RUN", "COPY", "ADD"):
            lowered = args.lower()
            assert not any(fetch in lowered for fetch in WEIGHT_FETCHES), f"{keyword} {args}"
            assert ".safetensors" not in lowered and "jmoshi-server" not in lowered, f"{keyword} {args}"
        assert not (keyword == "ADD" and "://" in args), "no downloads with ADD"
    rules = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", ".dockerignore allow-lists what the image needs (keeps out .env, weights)"
    included = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert included <= {"pyproject.toml", "README.md", "static", "jmoshi_server"}
    for args in instruction_args("COPY"):
        for source in args.split()[:-1]:
            assert source.rstrip("/") in included, f"COPY {source} is excluded by .dockerignore"


def test_container_installs_dependencies_before_the_code() -> None:
    steps = dockerfile()
    (base,) = [args for keyword, args in steps if keyword == "FROM"]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    copies = [(i, args) for i, (keyword, args) in enumerate(steps) if keyword == "COPY"]
    deps_at = next(i for i, args in copies if args.startswith("pyproject.toml"))
    code_at = next(i for i, args in copies if args.startswith("jmoshi_server"))
    assert not any("jmoshi_server" in args for i, args in copies if i < deps_at)
    installs = [i for i, (keyword, args) in enumerate(steps) if keyword == "RUN" and "pip install" in args]
    assert any(deps_at < i < code_at for i in installs), "a dependency layer between the two COPYs"
    assert any(i > code_at and "--no-deps" in steps[i][1] for i in installs)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert any(dep.startswith("cryptography") for dep in pyproject["project"]["dependencies"])


def test_container_entrypoint_is_the_server_with_real_flags() -> None:
    (entry,) = instruction_args("ENTRYPOINT")
    argv = exec_form(entry) + [arg for cmd in instruction_args("CMD") for arg in exec_form(cmd)]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] == "jmoshi-server" and argv[0] in scripts
    flags = {option for action in build_parser({})._actions for option in action.option_strings}
    given = [arg.split("=")[0] for arg in argv[1:] if arg.startswith("--")]
    assert set(given) <= flags, f"unknown flags: {set(given) - flags}"
    parse_config(argv[1:], env={**dockerfile_env(), **env_example()})
    # A flag in the image would silently override the JMOSHI_* variable of the same name.
    shadowed = {"JMOSHI_" + flag[2:].replace("-", "_").upper() for flag in given}
    assert not shadowed & (set(env_example()) | set(dockerfile_env()))


def test_container_empty_env_values_mean_default() -> None:
    """Env files leave optional settings empty; that must mean 'default', not '' or an error."""
    env = {"JMOSHI_TOKEN": "", "JMOSHI_SEED": "", "JMOSHI_TLS_CERT": "", "JMOSHI_PORT": ""}
    config = parse_config([], env=env)
    assert config.token is None and config.seed is None and config.tls_cert is None
    assert config.port == 8998
    with pytest.raises(SystemExit):
        parse_config([], env={"JMOSHI_TOKEN": "  "})  # blank but not empty: a mistake, said so
