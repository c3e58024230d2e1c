"""The CLIP-style dual encoder: real frozen towers (EfficientNet-Lite0, MiniLM), trained heads.

One small training run (64 px images, 2x2 feature maps, a few hundred images per dataset) is shared
by the tests; its tower features are cached in a temporary folder, so later calls reuse them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_hub import save_tiny_clip

from common.data.images import load_digits, load_fashion_mnist
from common.models import load_model, resolve_site, tokens_from
from common.models.clip_style import (
    CLIPStyleConfig,
    CLIPStyleModel,
    ImageTower,
    TextTower,
    cached_image_features,
    fit_heads,
    info_nce,
    main,
    shared_image_features,
    to_pixels,
    train_clip_style,
)

SMALL = 64  # px: a 2x2 feature map, ~12x cheaper than 224 px


@pytest.fixture(scope="module")
def loaded_image():
    return load_model("efficientnet-lite0")


@pytest.fixture(scope="module")
def text_tower():
    return TextTower(load_model("minilm-l6"))


@pytest.fixture(scope="module")
def small_tower(loaded_image):
    return ImageTower(loaded_image, SMALL)


@pytest.fixture(scope="module")
def trained(small_tower, text_tower, tmp_path_factory):
    cache = tmp_path_factory.mktemp("clip_features")
    model, metrics = train_clip_style(
        n_train=300,
        n_test=150,
        d_embed=64,
        image_size=SMALL,
        epochs=15,
        batch_size=128,
        seed=0,
        cache_dir=cache,
        linear_probe=False,
        image_tower=small_tower,
        text_tower=text_tower,
        progress=False,
    )
    return model, metrics, cache


def test_training_loss_falls(trained):
    _, metrics, _ = trained
    losses = metrics["train"]["loss_per_epoch"]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0], losses


def test_zero_shot_beats_chance_on_held_out_images(trained):
    _, metrics, _ = trained
    for name, entry in metrics["datasets"].items():
        assert entry["chance"] == pytest.approx(0.1)
        assert entry["n_test"] == 150
        # 10 classes: chance is 0.1; ask for 4x chance on 150 held-out images per dataset.
        assert entry["zero_shot_accuracy"] > 0.4, (name, entry)
        assert entry["zero_shot_accuracy_unseen_prompts"] > 0.3, (name, entry)


def test_image_tokens_match_the_features_site_at_224(loaded_image, text_tower):
    model = CLIPStyleModel(
        CLIPStyleConfig(image_size=224), image_tower=ImageTower(loaded_image, 224)
    )
    images = load_fashion_mnist("test").images[:2]
    with torch.no_grad():
        tokens = model.image_tokens(images)
        captured = []
        handle = resolve_site(loaded_image, "features").register(captured.append)
        try:
            loaded_image.model(loaded_image.preprocess(to_pixels(images, 224)))
        finally:
            handle.remove()
    assert tokens.patches.shape == (2, 49, 1280)
    assert tokens.pooled.shape == (2, 1280)
    torch.testing.assert_close(
        tokens.patches, tokens_from(captured[0], "spatial"), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(tokens.pooled, tokens.patches.mean(1))
    emb = model.encode_image(images)
    assert emb.shape == (2, 256)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


def test_image_input_forms_agree(trained):
    model, _, _ = trained
    grey = load_digits("test").images[:3]  # uint8 (3, 8, 8)
    as_float = grey.float().div(255).unsqueeze(1)  # (3, 1, 8, 8) in [0, 1]
    rgb = as_float.expand(-1, 3, -1, -1)
    with torch.no_grad():
        ref = model.encode_image(grey)
        torch.testing.assert_close(model.encode_image(as_float), ref)
        torch.testing.assert_close(model.encode_image(rgb), ref)
        torch.testing.assert_close(model.encode_image(grey.numpy()), ref)
        assert not torch.allclose(model.encode_image(grey.flip(-1)), ref)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.zeros(2, 2, 28, 28, dtype=torch.uint8), r"\(B, H, W\), \(B, 1, H, W\)"),
        (torch.zeros(28, 28, dtype=torch.uint8), "add a batch dimension"),
        (torch.zeros(2, 28, 28, 3, dtype=torch.uint8), "channels last"),
        (torch.full((2, 28, 28), 255.0), "divide 0..255 floats by 255"),
        (torch.zeros(0, 28, 28, dtype=torch.uint8), "empty batch"),
    ],
)
def test_bad_images_error_clearly(trained, images, match):
    model, _, _ = trained
    with pytest.raises(ValueError, match=match):
        model.encode_image(images)


def test_bad_text_and_features_error_clearly(trained):
    model, _, _ = trained
    with pytest.raises(TypeError, match="list of strings"):
        model.encode_text("a photo of a coat")
    with pytest.raises(ValueError, match=r"shape \(B, 1280\)"):
        model.project_image_features(torch.zeros(4, 384))
    with pytest.raises(ValueError, match="image_size"):
        CLIPStyleConfig(image_size=16)


def test_save_load_round_trip(trained, small_tower, text_tower, tmp_path):
    model, _, _ = trained
    model.save(tmp_path)
    again = CLIPStyleModel.load(tmp_path, image_tower=small_tower, text_tower=text_tower)
    images = load_fashion_mnist("test").images[:4]
    texts = ["a photo of a coat.", "a handwritten digit seven.", "anything at all"]
    with torch.no_grad():
        assert torch.equal(again.encode_image(images), model.encode_image(images))
        assert torch.equal(again.encode_text(texts), model.encode_text(texts))
    assert again.cfg == model.cfg
    assert json.loads((tmp_path / "config.json").read_text())["image_size"] == SMALL


def test_load_refuses_other_tower_weights(trained, small_tower, tmp_path):
    model, _, _ = trained
    model.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["image_model_revision"] = "0" * 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="retrain the heads"):
        CLIPStyleModel.load(tmp_path, image_tower=small_tower)
    with pytest.raises(FileNotFoundError, match="clip_style train"):
        CLIPStyleModel.load(tmp_path / "missing")


def test_feature_cache_is_reused(trained, small_tower):
    _, _, cache = trained
    images = load_digits("train").subset(300, seed=0)
    first, _, computed = cached_image_features(
        small_tower, images, cache, f"digits-train-{SMALL}px", progress=False
    )
    assert computed == 0  # the training run wrote every chunk
    with torch.inference_mode():
        direct = small_tower.tokens(images.images[:5]).pooled
    torch.testing.assert_close(first[:5], direct, atol=1e-4, rtol=0)


def test_fit_heads_is_deterministic(small_tower, text_tower, trained):
    _, _, cache = trained
    from common.models.clip_style import CaptionedFeatures, caption_groups

    images = load_digits("train").subset(120, seed=1)
    x, _, _ = cached_image_features(small_tower, images, cache, "det", progress=False)
    names, captions = caption_groups([images])
    with torch.inference_mode():
        caps = text_tower.features([c for g in captions for c in g]).reshape(len(names), -1, 384)
    data = CaptionedFeatures(x, images.labels, caps.clone(), names)
    runs = []
    for _ in range(2):
        model = CLIPStyleModel(CLIPStyleConfig(d_embed=32, image_size=SMALL), seed=3)
        fit_heads(model, data, epochs=2, batch_size=32, seed=3)
        runs.append(model.state_dict())
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_info_nce_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    b = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    t = math.log(10.0)
    s = 10.0 * a @ b.T
    clip = -0.5 * (s.log_softmax(1).diag().mean() + s.log_softmax(0).diag().mean())
    torch.testing.assert_close(info_nce(a, b, t), clip)
    torch.testing.assert_close(info_nce(a, b, t, torch.arange(5)), clip)
    # Groups {0, 1} and {2, 3, 4}: each row's target spreads over its group.
    groups = torch.tensor([0, 0, 1, 1, 1])
    same = (groups[:, None] == groups[None]).float()
    y = same / same.sum(1, keepdim=True)
    direct = -0.5 * ((y * s.log_softmax(1)).sum(1).mean() + (y * s.log_softmax(0)).sum(0).mean())
    torch.testing.assert_close(info_nce(a, b, t, groups), direct)


def test_cli_writes_model_and_metrics(trained, tmp_path):
    _, _, cache = trained
    metrics_path = tmp_path / "metrics" / "clip_style.json"
    argv = ["train", "--out", str(tmp_path / "run"), "--metrics", str(metrics_path)]
    argv += ["--n-train", "300", "--n-test", "150", "--image-size", str(SMALL), "--d-embed", "64"]
    argv += ["--epochs", "2", "--batch-size", "128", "--cache-dir", str(cache), "--no-progress"]
    assert main(argv) == 0
    metrics = json.loads(metrics_path.read_text())
    assert metrics["features"]["n_images_computed"] == 0  # every feature came from the cache
    assert metrics["features"]["patch_tokens_per_image"] == 4
    assert set(metrics["datasets"]) == {"fashion-mnist", "digits"}
    assert 0.0 <= metrics["datasets"]["digits"]["linear_probe_accuracy"] <= 1.0
    assert CLIPStyleModel.load(tmp_path / "run").cfg.d_embed == 64
    with pytest.raises(SystemExit, match="no caption templates"):
        main(["train", "--out", str(tmp_path / "x"), "--datasets", "cifar10"])


def test_hub_clip_adapter_has_the_same_api(tmp_path):
    """A tiny random transformers CLIPModel on disk stands in for a hub CLIP (GPU/hub profile)."""
    from common.models.clip_style import HubCLIP, load_clip

    save_tiny_clip(tmp_path)
    clip = load_clip(tmp_path)
    assert isinstance(clip, HubCLIP)
    images = load_fashion_mnist("test").images[:3]
    with torch.no_grad():
        tokens = clip.image_tokens(images)
        assert tokens.patches.shape == (3, 16, 32) and tokens.pooled.shape == (3, 32)
        emb = clip.encode_image(images)
        pixels = clip.preprocess(to_pixels(images, 32))
        ref = clip.model.visual_projection(clip.model.vision_model(pixel_values=pixels)[1])
        torch.testing.assert_close(emb, F.normalize(ref, dim=-1))
        text_emb = clip.encode_text(["a photo of a coat.", "a sandal"])
        assert text_emb.shape == (2, 24)
        torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(2))
        assert clip.zero_shot_weights(["coat", "bag"], ["a photo of a {}."]).shape == (2, 24)
    # the vision papers' feature accessor takes the hub model by its path / name too
    feats, subset = shared_image_features("fashion-mnist", "test", 3, 0, clip_dir=tmp_path)
    torch.testing.assert_close(feats, clip.image_features(subset.images))
    with torch.no_grad():
        emb = clip.encode_image(subset.images)
        torch.testing.assert_close(clip.project_image_features(feats), emb)
        # the CLIP-style attributes the vision notebooks read
        assert clip.cfg.image_size == 32 and clip.image_tower.image_size == 32
        torch.testing.assert_close(clip.image_tower.tokens(subset.images).pooled, feats)
        head = clip.image_proj((feats - clip.image_mean) / clip.image_std)
        torch.testing.assert_close(F.normalize(head, dim=-1), emb)
    with pytest.raises(FileNotFoundError, match="clip_style train"):
        load_clip(
            tmp_path / "empty_dir_that_exists" if (tmp_path / "x").mkdir() else tmp_path / "x"
        )


def test_shared_image_features_read_the_stage_cache_without_writing(trained, small_tower):
    _, _, cache = trained
    before = sorted(p.name for p in Path(cache).rglob("*.safetensors"))
    feats, images = shared_image_features(
        "digits",
        "train",
        300,
        0,
        cache_dir=cache,
        image_size=SMALL,
        tower=small_tower,
        progress=False,
    )
    cached, _, _ = cached_image_features(
        small_tower, images, cache, f"digits-train-{SMALL}px", progress=False
    )
    torch.testing.assert_close(feats, cached)
    # a subset the stage never computed is computed on the fly and not written back
    other, _ = shared_image_features(
        "digits",
        "train",
        7,
        3,
        cache_dir=cache,
        image_size=SMALL,
        tower=small_tower,
        progress=False,
    )
    assert other.shape == (7, feats.shape[1])
    assert sorted(p.name for p in Path(cache).rglob("*.safetensors")) == before
