"""Papers 17 and 37 run end to end on a Stable Diffusion pipeline named by params (the GPU/hub
profile's path), here a tiny SD (17) and a tiny SDXL without guidance, as SDXL Turbo samples (37),
scored zero-shot by a tiny CLIP. The models are random: this checks the wiring, not the results."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny_hub import save_tiny_clip, save_tiny_sd

CLASSES = "class_names=[cat,dog,tree,car]"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {
        "sd": save_tiny_sd(root),
        "sdxl": save_tiny_sd(root, sdxl=True),
        "clip": save_tiny_clip(root / "clip"),
    }


def run_notebook(notebook, out_dir, *literals):
    metrics = out_dir / "metrics.json"
    cmd = [sys.executable, "-m", "common.notebooks", notebook, str(out_dir / "run.ipynb")]
    cmd += ["--set", "seeds=[0]", f"metrics_path={metrics}", f"figure_dir={out_dir / 'figs'}"]
    subprocess.run(cmd + list(literals), check=True, capture_output=True, timeout=600)
    return json.loads(metrics.read_text()), sorted(p.name for p in (out_dir / "figs").iterdir())


def test_saeuron_notebook_on_a_hub_pipeline(hub, tmp_path):
    metrics, figures = run_notebook(
        "papers/17_saeuron/saeuron.ipynb", tmp_path,
        f"diffusion={hub['sd']}", f"scorer={hub['clip']}", CLASSES,
        "site=unet.up_blocks.1.attentions.0", "num_steps=2", "per_template=2", "d_sae=32", "k=4",
        "sae_steps=20", "batch_size=64", "tau=4", "n_eval=4", "insert_targets=[cat]",
        'multi_targets=["cat,dog"]', 'similar_groups=["cat,dog"]', "show_target=cat",
        "grid_images=2",
    )  # fmt: skip
    config = metrics["config"]
    assert config["diffusion"] == str(hub["sd"]) and config["scorer"] == str(hub["clip"])
    assert config["class_names"] == ["cat", "dog", "tree", "car"]
    assert config["timesteps"] == [999, 499]
    # 4 classes x 2 images x 2 steps x 2 guidance rows x 8x8 latent positions, 8 channels
    assert config["n_tokens"] == 4 * 2 * 2 * 2 * 64 and config["d_in"] == 8
    assert set(metrics["seeds"]["0"]["per_target"]) == {"cat", "dog", "tree", "car"}
    assert "unlearning_grid.png" in figures and "interference.png" in figures


def test_one_step_notebook_on_an_sdxl_pipeline_without_guidance(hub, tmp_path):
    metrics, figures = run_notebook(
        "papers/37_one_step/one_step.ipynb", tmp_path,
        f"diffusion={hub['sdxl']}", f"scorer={hub['clip']}", CLASSES, "guidance_scale=1.0",
        "sample_batch_size=3", "train_per_class=2", "n_templates=1", "eval_per_class=2",
        "four_step_per_class=2", "k=2", "expansion=2", "steps=20", "batch_size=64", "n_features=2",
        "sources_per_target=1", "steer_images=1", "grid_columns=3",
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
