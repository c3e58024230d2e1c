"""Scorers of generated images: the CNN and CLIP zero-shot answer one interface, and the zero-shot
logits are exactly CLIP's own ``logits_per_image`` (checked against transformers' CLIPModel)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tiny_hub import save_tiny_clip, save_tiny_sd

from common.models.classifier import ClassifierConfig, ImageClassifier
from common.models.clip_style import to_pixels
from common.models.diffusion import main
from common.models.scorers import ZeroShotScorer, load_scorer

NAMES = ("cat", "dog", "tree")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def test_zero_shot_logits_are_clips_logits_per_image(tiny_clip):
    scorer = load_scorer(tiny_clip, NAMES)
    assert isinstance(scorer, ZeroShotScorer) and scorer.cfg.n_classes == 3
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    logits = scorer(images)
    clip = scorer.clip
    tokens = clip.tokenizer(
        [f"a photo of a {c}." for c in NAMES], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        ref = clip.model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=clip.preprocess(to_pixels(images, 32)),
        ).logits_per_image
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(scorer.predict(images), ref.argmax(-1))
    emb = scorer.embed(images)
    assert emb.shape == (4, 24)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    # grey images (the 16x16 model's) are read as RGB too
    assert scorer(images[:, :1]).shape == (4, 3)


def test_load_scorer_reads_the_cnn_and_checks_its_classes(tmp_path):
    torch.manual_seed(0)
    cnn = ImageClassifier(ClassifierConfig(n_classes=3, image_size=16, class_names=NAMES))
    cnn.save(tmp_path / "cnn")
    loaded = load_scorer(tmp_path / "cnn")
    assert isinstance(loaded, ImageClassifier)
    assert load_scorer(tmp_path / "cnn", NAMES).cfg.class_names == NAMES
    x = torch.rand(5, 1, 16, 16)
    assert loaded.embed(x).shape == (5, 128) and loaded(x).shape == (5, 3)
    torch.testing.assert_close(loaded.head[-1](loaded.embed(x)), loaded(x))
    with pytest.raises(ValueError, match="knows"):
        load_scorer(tmp_path / "cnn", ["car", "bus", "tram"])


def test_a_clip_scorer_needs_class_names(tiny_clip):
    with pytest.raises(ValueError, match="class_names"):
        load_scorer(tiny_clip)
    with pytest.raises(ValueError, match=">= 2 class names"):
        load_scorer(tiny_clip, ["cat"])


def test_sample_cli_draws_and_scores_a_hub_pipeline(tiny_clip, tmp_path):
    """`python -m common.models.diffusion sample` on a (tiny) SD pipeline, scored by CLIP."""
    sd = save_tiny_sd(tmp_path)
    main(["sample", "--model", str(sd), "--classifier", str(tiny_clip), "--class-names",
          *NAMES, "--per-class", "2", "--steps", "1", "--out", str(tmp_path / "out")])  # fmt: skip
    run = json.loads((tmp_path / "out" / "metrics.json").read_text())["runs"][0]
    assert set(run["per_class_accuracy"]) == set(NAMES) and 0 <= run["accuracy"] <= 1
    grid = Image.open(tmp_path / "out" / "samples_1steps.png")
    assert grid.mode == "RGB" and grid.size[1] == 3 * (16 * 3 + 1)  # one row per class
