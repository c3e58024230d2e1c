"""Papers 17 and 37 run end to end on a Stable Diffusion pipeline named by params (the GPU/hub
profile's path), here a tiny SD (17) and a tiny SDXL without guidance, as SDXL Turbo samples (37),
scored zero-shot by a tiny CLIP. The models are random: this checks the wiring, not the results.

Each notebook runs as the pipeline runs it (``python -m common.kit run <folder>``), in a throwaway
copy of the checkout (``common/``, ``papers/``) whose ``params.yaml`` is this checkout's with the
folder's section and the seeds replaced, so its metrics, figures and activation stores land in the
copy, not in the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_hub import save_tiny_clip, save_tiny_sd

from common.params import load_yaml, paper_section

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "tree", "car"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {
        "sd": save_tiny_sd(root),
        "sdxl": save_tiny_sd(root, sdxl=True),
        "clip": save_tiny_clip(root / "clip"),
    }


def run_paper(folder: str, tmp_path: Path, values: dict) -> tuple[dict, list[str]]:
    """Run ``papers/<folder>`` with its section of params.yaml updated by ``values``
    (and the smallest seed list params allow); its metrics.json and figure names."""
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints")
    for part in ("common", "papers"):
        shutil.copytree(ROOT / part, repo / part, ignore=ignore)
    params = load_yaml((ROOT / "params.yaml").read_text())
    params["papers"]["seeds"] = [0, 1, 2]
    key = paper_section(folder)
    params["papers"][key] = {**params["papers"][key], **values}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(repo)}
    env.pop("SAE_PARAMS_FILE", None)
    cmd = [sys.executable, "-m", "common.kit", "run", folder, "--no-html"]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((repo / "metrics" / "papers" / folder / "metrics.json").read_text())
    return metrics, sorted(p.name for p in (repo / "figures" / folder).iterdir())


def test_saeuron_notebook_on_a_hub_pipeline(hub, tmp_path):
    metrics, figures = run_paper(
        "17_saeuron", tmp_path,
        {"diffusion": str(hub["sd"]), "scorer": str(hub["clip"]), "class_names": CLASSES,
         "site": "unet.up_blocks.1.attentions.0", "num_steps": 2, "per_template": 2, "d_sae": 32,
         "k": 4, "sae_steps": 20, "batch_size": 64, "tau": 4, "n_eval": 4,
         "insert_targets": ["cat"], "multi_targets": ["cat,dog"], "similar_groups": ["cat,dog"],
         "show_target": "cat", "grid_images": 2},
    )  # fmt: skip
    config = metrics["config"]
    assert config["diffusion"] == str(hub["sd"]) and config["scorer"] == str(hub["clip"])
    assert config["class_names"] == CLASSES and config["seeds"] == [0, 1, 2]
    assert config["timesteps"] == [999, 499]
    # 4 classes x 2 images x 2 steps x 2 guidance rows x 8x8 latent positions, 8 channels
    assert config["n_tokens"] == 4 * 2 * 2 * 2 * 64 and config["d_in"] == 8
    assert set(metrics["seeds"]["0"]["per_target"]) == set(CLASSES)
    assert "unlearning_grid.png" in figures and "interference.png" in figures
    store = tmp_path / "repo" / config["activation_store"]  # the SAE's training tokens
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_tokens"] == config["n_tokens"]
    assert manifest["metadata"]["site"] == "unet.up_blocks.1.attentions.0"
    assert (store / "tokens_meta.safetensors").is_file()


def test_one_step_notebook_on_an_sdxl_pipeline_without_guidance(hub, tmp_path):
    metrics, figures = run_paper(
        "37_one_step", tmp_path,
        {"diffusion": str(hub["sdxl"]), "scorer": str(hub["clip"]), "class_names": CLASSES,
         "guidance_scale": 1.0, "sample_batch_size": 3, "train_per_class": 2, "n_templates": 1,
         "eval_per_class": 2, "four_step_per_class": 2, "k": 2, "expansion": 2, "steps": 20,
         "batch_size": 64, "n_features": 2, "sources_per_target": 1, "steer_images": 1,
         "grid_columns": 3},
    )  # fmt: skip
    config = metrics["config"]
    assert config["diffusion"] == str(hub["sdxl"]) and config["guidance_scale"] == 1.0
    assert config["sample_batch_size"] == 3  # 8 training captions: U-Net calls of 3, 3, 2
    assert config["sites"][0] == "unet.down_blocks.0.attentions.0" and len(config["sites"]) == 4
    blocks = metrics["seeds"]["0"]["blocks"]
    assert all(b["l0"] <= 2 for b in blocks.values())  # TopK k = 2 on 8-channel updates
    # without guidance every row is conditional: class features are found, so steering changes
    # the images (with the rows misread as unconditional the steering vectors would be zero)
    assert all(b["steering"]["rms_low"] + b["steering"]["rms_high"] > 0 for b in blocks.values())
    assert figures == [
        "ablation_grid.png",
        "block_effects.png",
        "steering_grid.png",
        "transfer.png",
    ]
    stores = tmp_path / "repo" / config["activation_stores"]
    assert sorted(p.name for p in stores.iterdir()) == ["eval", "eval4", "train", "train4"]
    assert len(list((stores / "train").glob("*/manifest.json"))) == 4  # one store per block
