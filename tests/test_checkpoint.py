"""Loading: the demo's old attention layout, local dirs, the HF cache offline, clear failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from moshi.models import loaders
from safetensors import safe_open
from safetensors.torch import save_file

from jmoshi_server.checkpoint import CheckpointError, checkpoint_info, load_model
from jmoshi_server.config import parse_config
from jmoshi_server.demo import TOKENIZER_NAME, train_tokenizer


def model_dir_config(path: Path, *extra: str):
    return parse_config(["--model-dir", str(path), "--device", "cpu", *extra], env={})


def test_demo_files_use_jmoshis_old_attention_layout(demo_dir):
    for name in (loaders.MOSHI_NAME, loaders.MIMI_NAME):
        with safe_open(str(demo_dir / name), "pt") as f:
            keys = list(f.keys())
        assert any(k.endswith("self_attn.in_proj_weight") for k in keys)
        assert any(k.endswith("self_attn.out_proj.weight") for k in keys)
        assert not any(".in_projs." in k or ".out_projs." in k for k in keys)


def test_old_layout_loads_to_the_same_tensors_as_the_new_layout(demo_dir, tmp_path):
    old = load_model(model_dir_config(demo_dir))
    # Re-save what moshi loaded (its own, new layout) and load that.
    new_dir = tmp_path / "new-layout"
    shutil.copytree(demo_dir, new_dir)
    save_file({k: v.contiguous() for k, v in old.lm.state_dict().items()}, str(new_dir / loaders.MOSHI_NAME))
    save_file({k: v.contiguous() for k, v in old.mimi.state_dict().items()}, str(new_dir / loaders.MIMI_NAME))
    with safe_open(str(new_dir / loaders.MOSHI_NAME), "pt") as f:
        assert any(".in_projs.0." in k for k in f.keys())  # noqa: SIM118 - safe_open is no dict
    new = load_model(model_dir_config(new_dir))
    for a, b in ((old.lm, new.lm), (old.mimi, new.mimi)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def test_missing_files_say_which(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"lacks {loaders.MIMI_NAME}, {loaders.TEXT_TOKENIZER_NAME}"):
        checkpoint_info(tmp_path)


def test_weights_that_do_not_fit_the_config_are_explained(demo_dir, tmp_path):
    broken = tmp_path / "no-config"
    shutil.copytree(demo_dir, broken)
    # Without config.json moshi assumes the full Moshi 7B shapes; the tiny weights do not fit.
    (broken / "config.json").unlink()
    shutil.copyfile(broken / TOKENIZER_NAME, broken / loaders.TEXT_TOKENIZER_NAME)
    with pytest.raises(CheckpointError, match="do not fit the model config"):
        load_model(model_dir_config(broken))


def test_tokenizer_must_match_text_card(demo_dir, tmp_path):
    other = tmp_path / "other-tokenizer"
    shutil.copytree(demo_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["tokenizer_name"] = "small.model"
    (other / "config.json").write_text(json.dumps(config))
    small = train_tokenizer(other / "small.model", vocab_size=400)
    assert small.vocab_size() != config["text_card"]
    with pytest.raises(CheckpointError, match="text_card"):
        load_model(model_dir_config(other))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_asked_without_a_gpu(demo_dir):
    with pytest.raises(CheckpointError, match="no CUDA GPU"):
        load_model(parse_config(["--model-dir", str(demo_dir), "--device", "cuda"], env={}))


def fill_hf_cache(hf_home: Path, repo: str, files_from: Path) -> None:
    """Lay files out exactly as huggingface_hub's cache does after a download."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    base = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = base / "snapshots" / revision
    shutil.copytree(files_from, snapshot)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(revision)


def test_hub_repo_served_offline_from_a_filled_cache(start_server, demo_dir, tmp_path):
    fill_hf_cache(tmp_path / "hf", "nu-dialogue/j-moshi", demo_dir)
    server = start_server(
        "--hf-repo",
        "nu-dialogue/j-moshi",
        "--device",
        "cpu",
        env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"},
        demo=False,
    )
    import urllib.request

    with urllib.request.urlopen(server.url + "/api/status", timeout=5) as resp:
        assert json.loads(resp.read())["model"] == "nu-dialogue/j-moshi"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--model-dir", "/nonexistent/jmoshi", "--device", "cpu"], {}, "is not a directory"),
        pytest.param(
            ["--model-dir", "/nonexistent/jmoshi", "--device", "cuda"],
            {},
            "no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message"),
        ),
        (
            ["--hf-repo", "nu-dialogue/j-moshi", "--device", "cpu"],
            {"HF_HUB_OFFLINE": "1"},
            "not in the HF cache",
        ),
        (["--model-dir", ".", "--device", "cpu"], {}, "lacks"),
    ],
)
def test_unloadable_model_exits_nonzero_with_one_clear_line(start_server, tmp_path, args, env, message):
    server = start_server(*args, env={"HF_HOME": str(tmp_path / "empty"), **env}, wait=False, demo=False)
    assert server.wait_exit() == 2
    errors = [line for line in server.log_text().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and message in errors[0], server.log_text()
