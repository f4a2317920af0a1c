"""Build the tiny, randomly-initialised demo checkpoint.

It is laid out like a J-Moshi model directory so it goes through exactly the loading code the
real weights use (``checkpoint.load_model``): ``config.json`` in the keys moshi's
``CheckpointInfo`` reads, a Mimi config, random weights as safetensors in the *old* attention
layout J-Moshi's checkpoint has (``in_proj_weight`` / ``out_proj.weight``, remapped by moshi's
load hook), and a SentencePiece unigram model with byte fallback whose vocabulary size is the
LM's ``text_card``, with J-Moshi's pad ids (3 = text padding, 0 = end-of-text padding).

The result speaks noise and writes random text. It exists so tests, CI and a CPU demo run
the real pipeline on any machine.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import sentencepiece
import torch
from moshi.models import loaders
from safetensors.torch import save_file

from .demo_corpus import sentences

log = logging.getLogger(__name__)

# Bump when the demo's layout or configs change so old caches are rebuilt.
DEMO_VERSION = 1
TOKENIZER_NAME = "tokenizer_spm_demo.model"
MIMI_CONFIG_NAME = "mimi_config.json"
DEMO_VOCAB_SIZE = 600
SEED = 1234

DEMO_MIMI_CONFIG = {
    "sample_rate": 24000,
    "channels": 1,
    "frame_rate": 12.5,
    "seanet": {**loaders._seanet_kwargs, "dimension": 64, "n_filters": 4},
    "quantizer": {
        **loaders._quantizer_kwargs,
        "dimension": 32,
        "input_dimension": 64,
        "output_dimension": 64,
    },
    "transformer": {
        **loaders._transformer_kwargs,
        "d_model": 64,
        "num_heads": 4,
        "num_layers": 2,
        "dim_feedforward": 128,
        "input_dimension": 64,
        "output_dimensions": [64],
    },
}


def demo_lm_kwargs(text_card: int) -> dict:
    """Moshi 7B's LM config shrunk to a few MB; same streams, delays and pad ids."""
    return {
        **loaders._lm_kwargs,
        "dim": 64,
        "text_card": text_card,
        "existing_text_padding_id": 3,
        "existing_text_end_padding_id": 0,
        "num_heads": 4,
        "num_layers": 2,
        "depformer_dim": 64,
        "depformer_dim_feedforward": 128,
        "depformer_num_heads": 4,
        "depformer_num_layers": 2,
    }


def default_demo_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "jmoshi-server" / f"demo-v{DEMO_VERSION}"


def train_tokenizer(
    out_path: Path, vocab_size: int = DEMO_VOCAB_SIZE
) -> sentencepiece.SentencePieceProcessor:
    """A unigram model with byte fallback, ids 0..3 as J-Moshi's control ids."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(sentences()) + "\n", encoding="utf-8")
        prefix = Path(tmp) / "spm"
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(prefix),
            model_type="unigram",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            byte_fallback=True,
            character_coverage=0.98,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece="<pad>",
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            minloglevel=2,
        )
        shutil.copyfile(prefix.with_suffix(".model"), out_path)
    return sentencepiece.SentencePieceProcessor(model_file=str(out_path))


_SPLIT_ATTENTION = re.compile(r"^(?P<prefix>.*\.)(?P<kind>in_projs|out_projs)\.(?P<index>\d+)\.weight$")


def to_old_attention_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Join moshi>=0.2.4's per-step ``in_projs.{i}``/``out_projs.{i}`` into J-Moshi's layout.

    The inverse of ``StreamingMultiheadAttention._load_hook``: the steps are concatenated on
    the first axis into ``in_proj_weight`` and ``out_proj.weight``.
    """
    old: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        match = _SPLIT_ATTENTION.match(key)
        if match is None:
            old[key] = value
            continue
        target = match["prefix"] + ("in_proj_weight" if match["kind"] == "in_projs" else "out_proj.weight")
        groups.setdefault(target, {})[int(match["index"])] = value
    for target, parts in groups.items():
        old[target] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
    return old


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))


def build_demo_checkpoint(target: Path) -> Path:
    """Write a complete demo model directory at ``target`` (atomically) and return it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        torch.manual_seed(SEED)
        tokenizer = train_tokenizer(staging / TOKENIZER_NAME)
        lm_kwargs = demo_lm_kwargs(text_card=tokenizer.vocab_size())
        mimi = loaders.get_mimi(None, DEMO_MIMI_CONFIG)
        lm = loaders.get_moshi_lm(None, lm_kwargs, dtype=torch.float32)
        _save(to_old_attention_layout(mimi.state_dict()), staging / loaders.MIMI_NAME)
        _save(to_old_attention_layout(lm.state_dict()), staging / loaders.MOSHI_NAME)
        (staging / MIMI_CONFIG_NAME).write_text(json.dumps(DEMO_MIMI_CONFIG, indent=2))
        config = {
            **lm_kwargs,
            "moshi_name": loaders.MOSHI_NAME,
            "mimi_name": loaders.MIMI_NAME,
            "mimi_config_name": MIMI_CONFIG_NAME,
            "tokenizer_name": TOKENIZER_NAME,
            "model_type": "moshi",
        }
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        try:
            staging.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_demo_checkpoint(target: Path | None = None) -> Path:
    """The cached demo checkpoint directory, built on first use."""
    target = target or default_demo_dir()
    if (target / "config.json").exists():
        return target
    log.info("building the demo checkpoint in %s (once; a few seconds)", target)
    return build_demo_checkpoint(target)
