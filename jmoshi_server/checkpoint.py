"""Find J-Moshi's files (hub, local directory or demo) and load them with moshi's loaders.

Every source ends up as a local directory holding the model files, and one function loads a
directory. So the demo checkpoint, ``--model-dir`` and the hub download share every line of
loading code. Failures become a CheckpointError whose message says what to do.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel

from .config import Config
from .demo import ensure_demo_checkpoint

log = logging.getLogger(__name__)

# What we take from a hub repo: weights, tokenizer, optional configs. Nothing else.
HUB_PATTERNS = ["*.safetensors", "*.model", "*.json"]
JMOSHI_BF16_GB = 19  # VRAM seen for J-Moshi in bf16 (the model card's RTX 4090 figure, rounded up)


class CheckpointError(RuntimeError):
    """The model cannot be loaded; the message tells the person what to do."""


@dataclass
class LoadedModel:
    mimi: MimiModel
    lm: LMModel
    tokenizer: sentencepiece.SentencePieceProcessor
    source: str  # hub repo id, directory, or "demo"
    directory: Path
    device: torch.device
    dtype: torch.dtype


def download_from_hub(repo: str) -> Path:
    """The repo's files in the normal HF cache (downloaded once, with progress bars)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    log.info("fetching %s from the Hugging Face hub (about 16 GB the first time; cached after)", repo)
    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS))
    except GatedRepoError as exc:
        raise CheckpointError(
            f"{repo} needs a Hugging Face token: accept its licence on the hub, then set HF_TOKEN"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(f"no repo {repo!r} on the hub: check --hf-repo / JMOSHI_HF_REPO") from exc
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"{repo} is not in the HF cache and the hub cannot be reached (offline?): "
            "download it once with network access, or point --model-dir at the files"
        ) from exc
    except OSError as exc:
        raise CheckpointError(f"downloading {repo} failed: {exc}") from exc


def resolve_directory(config: Config) -> tuple[str, Path]:
    """(source label, local directory with the model files) for this config."""
    if config.demo:
        return "demo", ensure_demo_checkpoint(config.demo_dir)
    if config.model_dir:
        if not config.model_dir.is_dir():
            raise CheckpointError(f"--model-dir {config.model_dir} is not a directory")
        return str(config.model_dir), config.model_dir
    return config.hf_repo, download_from_hub(config.hf_repo)


def checkpoint_info(directory: Path) -> loaders.CheckpointInfo:
    """moshi's CheckpointInfo for a local directory, without touching the network.

    With a config.json, its file names and LM config are used (moshi's own reader). Without
    one, as in J-Moshi's repos, moshi's Moshi 7B defaults apply.
    """
    config_path = directory / "config.json"
    raw = json.loads(config_path.read_text()) if config_path.exists() else {}
    names = {
        "moshi_weights": raw.get("moshi_name", loaders.MOSHI_NAME),
        "mimi_weights": raw.get("mimi_name", loaders.MIMI_NAME),
        "tokenizer": raw.get("tokenizer_name", loaders.TEXT_TOKENIZER_NAME),
    }
    paths = {key: directory / name for key, name in names.items()}
    mimi_config_name = raw.get("mimi_config_name")
    if mimi_config_name:
        paths["mimi_config_path"] = directory / mimi_config_name
    missing = sorted(p.name for p in paths.values() if not p.is_file())
    if missing:
        raise CheckpointError(
            f"{directory} lacks {', '.join(missing)}: a J-Moshi directory holds "
            f"{loaders.MOSHI_NAME}, {loaders.MIMI_NAME} and {loaders.TEXT_TOKENIZER_NAME}"
        )
    if not config_path.exists():
        log.info("no config.json in %s: using moshi's Moshi 7B config, as J-Moshi does", directory)
        return loaders.CheckpointInfo(paths["moshi_weights"], paths["mimi_weights"], paths["tokenizer"])
    return loaders.CheckpointInfo.from_hf_repo(str(directory), config_path=config_path, **paths)


def check_device(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(
            "--device cuda was asked but torch sees no CUDA GPU: check the NVIDIA driver and "
            "container runtime (docker compose needs the GPU reservation), or try --demo on cpu"
        )


def load_model(config: Config) -> LoadedModel:
    device = torch.device(config.resolved_device)
    dtype = getattr(torch, config.resolved_dtype)
    check_device(device)
    source, directory = resolve_directory(config)
    info = checkpoint_info(directory)
    try:
        tokenizer = info.get_text_tokenizer()
        mimi = info.get_mimi(device=device)
        lm = info.get_moshi(device=device, dtype=dtype)
    except torch.cuda.OutOfMemoryError as exc:
        raise CheckpointError(
            f"not enough GPU memory to load {source}: J-Moshi needs about {JMOSHI_BF16_GB} GB "
            "in bf16; free the GPU or use a larger one"
        ) from exc
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"the files in {directory} do not fit the model config ({first_line}): "
            "are they a J-Moshi / Moshi 7B checkpoint with its matching config.json?"
        ) from exc
    if lm.text_card != tokenizer.vocab_size():
        raise CheckpointError(
            f"the LM's text_card ({lm.text_card}) differs from the tokenizer's vocabulary "
            f"({tokenizer.vocab_size()}): wrong tokenizer file in {directory}"
        )
    log.info("loaded %s on %s (%s)", source, device, str(dtype).removeprefix("torch."))
    return LoadedModel(mimi, lm, tokenizer, source, directory, device, dtype)
