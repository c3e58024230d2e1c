"""The offline diffusion model (papers 17, 37): text conditioning, training, DDIM + CFG sampling,
U-Net hook sites (capture and replacement), save/load, and the sample classifier.

A tiny U-Net (8x8 images, channels (8, 16)) trains for a few dozen steps on a Fashion-MNIST subset;
the captions go through the real MiniLM.
"""

from __future__ import annotations

import json

import pytest
import torch

from common.data.images import load_fashion_mnist, resize
from common.models.classifier import (
    ClassifierConfig,
    accuracy,
    load_classifier,
    score,
    train_classifier,
)
from common.models.diffusion import (
    CaptionEncoder,
    DiffusionTrainConfig,
    UNetConfig,
    build_unet,
    capture_sites,
    class_captions,
    ddim_scheduler,
    list_unet_sites,
    load_diffusion,
    load_tokens,
    main,
    replace_site,
    sample,
    save_tokens,
    train_diffusion,
)

TINY = UNetConfig(image_size=8, channels=(8, 16), heads=2, norm_groups=4)
CLASSES = (0, 1, 7)  # t-shirt, trouser, sneaker


@pytest.fixture(scope="module")
def encoder() -> CaptionEncoder:
    return CaptionEncoder()


@pytest.fixture(scope="module")
def fmnist() -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    data = load_fashion_mnist("train").subset(4000, seed=0)
    keep = torch.isin(data.labels, torch.tensor(CLASSES))
    return data.images[keep], data.labels[keep], data.class_names


@pytest.fixture(scope="module")
def trained(tmp_path_factory, encoder, fmnist):
    images, labels, names = fmnist
    out = tmp_path_factory.mktemp("diffusion")
    cfg = DiffusionTrainConfig(steps=100, batch_size=32, lr=3e-3, warmup_steps=10)
    model, metrics = train_diffusion(
        resize(images, 8), labels, names, out, unet_cfg=TINY, cfg=cfg, encoder=encoder,
        progress=False,
    )  # fmt: skip
    return model, metrics, out


def test_caption_encoder_pads_masks_and_caches(encoder):
    emb, mask = encoder(["a photo of a sneaker", "", "a photo of a sneaker"])
    assert emb.shape == (3, 16, 384) and mask.shape == (3, 16)
    n_tokens = len(encoder.text_model.tokenizer("a photo of a sneaker")["input_ids"])
    assert mask[0].sum() == n_tokens and mask[1].sum() == 2  # "" is [CLS] [SEP]
    assert torch.equal(emb[0], emb[2])
    assert not torch.allclose(emb[0], emb[1])
    with pytest.raises(ValueError, match="max_tokens"):
        encoder(["a photo of a " + "very " * 20 + "long coat"])


def test_unet_size_and_sites_in_forward_order():
    unet = build_unet(UNetConfig())
    assert 0.5e6 < sum(p.numel() for p in unet.parameters()) < 2e6
    assert list_unet_sites(unet) == [
        "unet.down_blocks.1.attentions.0",
        "unet.down_blocks.2.attentions.0",
        "unet.mid_block.attentions.0",
        "unet.up_blocks.0.attentions.0",
        "unet.up_blocks.0.attentions.1",
        "unet.up_blocks.1.attentions.0",
        "unet.up_blocks.1.attentions.1",
    ]
    with pytest.raises(ValueError, match="Valid sites: unet.down_blocks.1.attentions.0"):
        capture_sites(unet, ["unet.mid_block.attention.0"])


def test_training_loss_falls_and_model_saved(trained):
    model, metrics, out = trained
    curve = metrics["loss_curve"]
    assert curve[-1] < 0.7 * curve[0], curve
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    card = json.loads((out / "diffusion.json").read_text())
    assert card["text_encoder_revision"] == model.encoder.revision


def test_resume_matches_uninterrupted_run(tmp_path, encoder, fmnist):
    images, labels, names = fmnist
    x = resize(images[:200], 8)
    cfg = DiffusionTrainConfig(steps=12, batch_size=8, checkpoint_every=5, warmup_steps=3)
    kw = dict(unet_cfg=TINY, cfg=cfg, encoder=encoder, progress=False)
    full, _ = train_diffusion(x, labels[:200], names, tmp_path / "a", **kw)
    train_diffusion(x, labels[:200], names, tmp_path / "b", stop_after=7, **kw)
    resumed, metrics = train_diffusion(x, labels[:200], names, tmp_path / "b", **kw)
    assert metrics["steps_this_run"] == 5
    other = dict(kw, cfg=DiffusionTrainConfig(steps=12, batch_size=8, lr=1e-4))
    with pytest.raises(ValueError, match="other settings"):
        train_diffusion(x, labels[:200], names, tmp_path / "b", **other)
    for (k, a), b in zip(full.unet.state_dict().items(), resumed.unet.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_sampling_shapes_determinism_and_guidance(trained):
    model = trained[0]
    captions = [model.caption(c) for c in CLASSES]
    a = sample(model, captions, num_steps=3, seed=1)
    assert a.shape == (3, 1, 8, 8) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, sample(model, captions, num_steps=3, seed=1))
    assert torch.allclose(a, sample(model, captions, num_steps=3, seed=1, batch_size=1), atol=1e-5)
    assert not torch.allclose(a, sample(model, captions, num_steps=3, seed=2))
    no_cfg = sample(model, captions, num_steps=3, seed=1, guidance_scale=1.0)
    assert (a - no_cfg).abs().max() > 1e-3
    ddim = sample(model, captions, num_steps=3, seed=1, eta=0.0)
    assert torch.equal(ddim, sample(model, captions, num_steps=3, seed=1, eta=0.0))
    assert (a - ddim).abs().max() > 1e-3  # eta = 1 adds fresh noise
    seen = []
    one = sample(model, captions, num_steps=1, seed=1, callback=lambda i, t, x: seen.append(t))
    assert one.shape == a.shape and seen == [999]  # trailing spacing: 1 step starts at T - 1


def test_capture_records_residual_updates_with_timesteps(trained):
    model = trained[0]
    unet = model.unet
    site = "unet.down_blocks.1.attentions.0"  # 16 channels at 4x4
    module = unet.get_submodule(site[len("unet.") :])
    manual, outputs = [], []

    def record(m, args, kwargs, out):
        manual.append(out[0] - args[0])
        outputs.append(out[0])

    handle = module.register_forward_hook(record, with_kwargs=True)
    try:
        with capture_sites(unet, [site, "unet.mid_block.attentions.0"]) as cap:
            with capture_sites(unet, [site], value="output") as cap_out:
                sample(model, [model.caption(0), model.caption(1)], num_steps=2, seed=0)
    finally:
        handle.remove()
    tokens, t, rows, calls = cap.tokens(site), cap.timesteps(site), cap.rows(site), cap.calls(site)
    # 2 steps x 4 rows (2 unconditional + 2 conditional) x 4x4 positions
    assert tokens.shape == (2 * 4 * 16, 16)
    assert t.shape == rows.shape == calls.shape == (len(tokens),)
    sched = ddim_scheduler(model)
    sched.set_timesteps(2)
    assert t.unique(sorted=True).tolist() == sorted(sched.timesteps.tolist())
    assert torch.equal(t[calls == 0], torch.full((64,), int(sched.timesteps[0])))
    assert torch.equal(rows[:16], torch.zeros(16, dtype=torch.long))
    expected = torch.cat([d.permute(0, 2, 3, 1).reshape(-1, 16) for d in manual])
    assert torch.allclose(tokens, expected)
    expected_out = torch.cat([y.permute(0, 2, 3, 1).reshape(-1, 16) for y in outputs])
    assert torch.allclose(cap_out.tokens(site), expected_out)
    assert not torch.allclose(cap_out.tokens(site), tokens)
    assert cap.tokens("unet.mid_block.attentions.0").shape[1] == 16


def test_replace_hook_identity_and_edit(trained):
    model = trained[0]
    site = "unet.up_blocks.0.attentions.1"
    captions = [model.caption(c) for c in CLASSES]
    base = sample(model, captions, num_steps=2, seed=0)
    seen_t = []

    def identity(x, t):
        seen_t.append(t)
        return x

    with replace_site(model.unet, site, identity):
        same = sample(model, captions, num_steps=2, seed=0)
    assert torch.equal(base, same)
    assert all(t.shape == (6 * 16,) for t in seen_t) and len(seen_t) == 2
    with replace_site(model.unet, site, lambda x, t: torch.zeros_like(x)):
        with capture_sites(model.unet, [site]) as cap:
            edited = sample(model, captions, num_steps=2, seed=0)
    assert (edited - base).abs().max() > 1e-4
    assert cap.tokens(site).abs().max() < 1e-6  # downstream sees the replaced update
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        with replace_site(model.unet, site, lambda x, t: x[:, :3]):
            sample(model, captions, num_steps=1)
    with replace_site(model.unet, site, lambda y, t: y, value="output"):
        assert torch.equal(sample(model, captions, num_steps=2, seed=0), base)
    with pytest.raises(ValueError, match="'update'"):
        replace_site(model.unet, site, lambda y, t: y, value="input").__enter__()
    unet_out = sample(model, captions, num_steps=2, seed=0)
    assert torch.equal(unet_out, base)  # hooks removed on exit


def test_hooks_know_each_rows_caption_across_batches(trained):
    model = trained[0]
    site = "unet.up_blocks.0.attentions.1"
    captions = [model.caption(c) for c in CLASSES]  # 3 captions, sampled 2 per U-Net call
    seen = []

    def record(x, t, caption):
        seen.append(caption)
        return x

    with capture_sites(model.unet, [site]) as cap:
        with replace_site(model.unet, site, record, per_caption=True):
            sample(model, captions, num_steps=1, batch_size=2)
    positions = 16  # 4x4 at this block
    # guided calls: [unconditional; conditional] rows, -1 marks the unconditional half
    assert seen[0].tolist() == [-1] * 2 * positions + [0] * positions + [1] * positions
    assert seen[1].tolist() == [-1] * positions + [2] * positions
    torch.testing.assert_close(cap.captions(site), torch.cat(seen))
    with capture_sites(model.unet, [site]) as cap:
        sample(model, captions, num_steps=1, guidance_scale=1.0, batch_size=2)
    assert cap.captions(site).tolist() == [c for c in range(3) for _ in range(positions)]
    x = torch.zeros(1, 1, 4, 4)
    cond = model.encoder([captions[0]])[0]
    with pytest.raises(RuntimeError, match="only known while `sample`"):
        with replace_site(model.unet, site, record, per_caption=True):
            model.unet(x, 999, cond)
    with capture_sites(model.unet, [site]) as cap:
        model.unet(x, 999, cond)
    with pytest.raises(RuntimeError, match="not made by `sample`"):
        cap.captions(site)


def test_captured_tokens_round_trip_through_the_activation_store(trained, tmp_path):
    model = trained[0]
    site = "unet.down_blocks.1.attentions.0"  # 16 channels at 4x4
    with capture_sites(model.unet, [site]) as cap:
        sample(model, [model.caption(0), model.caption(1)], num_steps=2, seed=0)
    folder = save_tokens(cap, site, tmp_path / "store", {"seed": 0})
    saved = load_tokens(folder)
    assert torch.equal(saved.tokens, cap.tokens(site)) and saved.shape == (16, 4, 4)
    for name in ("timesteps", "rows", "calls", "captions"):
        assert torch.equal(getattr(saved, name), getattr(cap, name)(site)), name
    assert saved.metadata["site"] == site and saved.metadata["seed"] == 0
    assert saved.positions == 16 and cap.shape(site) == (16, 4, 4)
    save_tokens(cap, site, folder)  # writing again replaces the store
    assert torch.equal(load_tokens(folder).tokens, saved.tokens)


def test_save_load_round_trip(trained, encoder):
    model, _, out = trained
    loaded = load_diffusion(out, encoder=encoder)
    assert loaded.class_names == model.class_names and loaded.templates == model.templates
    for (k, a), b in zip(model.unet.state_dict().items(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b), k
    captions = [model.caption(1)]
    assert torch.equal(sample(model, captions, num_steps=2), sample(loaded, captions, num_steps=2))
    with pytest.raises(FileNotFoundError, match="python -m common.models.diffusion train"):
        load_diffusion(out / "unet")


def test_classifier_above_chance_and_round_trip(tmp_path):
    train, test = load_fashion_mnist("train").subset(3000), load_fashion_mnist("test").subset(1000)
    cfg = ClassifierConfig(class_names=train.class_names)
    model = train_classifier(resize(train.images, 16), train.labels, cfg=cfg, epochs=1,
                             progress=False)  # fmt: skip
    x_test = resize(test.images, 16)
    acc = accuracy(model, x_test, test.labels)
    assert acc > 0.5, acc  # chance is 0.1
    model.save(tmp_path)
    loaded = load_classifier(tmp_path)
    assert torch.equal(loaded.predict(x_test), model.predict(x_test))
    result = score(loaded, x_test, test.labels)
    assert result["accuracy"] == pytest.approx(acc)
    assert set(result["per_class_accuracy"]) == set(train.class_names)
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16\)"):
        model(torch.zeros(2, 1, 28, 28))


def test_sample_cli_writes_grid_and_scored_metrics(trained, fmnist, tmp_path):
    model, _, out = trained
    images, labels, names = fmnist
    clf = train_classifier(resize(images, 8), labels, epochs=0.5, progress=False,
                           cfg=ClassifierConfig(10, 8, 8, names))  # fmt: skip
    clf.save(tmp_path / "clf")
    main(["sample", "--model", str(out), "--classifier", str(tmp_path / "clf"), "--per-class",
          "2", "--steps", "2", "1", "--out", str(tmp_path / "fig")])  # fmt: skip
    metrics = json.loads((tmp_path / "fig" / "metrics.json").read_text())
    assert [r["num_steps"] for r in metrics["runs"]] == [2, 1]
    # params.yaml gives the step counts as one comma-separated string
    main(["sample", "--model", str(out), "--per-class", "1", "--steps", "1,2",
          "--out", str(tmp_path / "fig2")])  # fmt: skip
    comma = json.loads((tmp_path / "fig2" / "metrics.json").read_text())
    assert [r["num_steps"] for r in comma["runs"]] == [1, 2]
    assert all(0 <= r["accuracy"] <= 1 for r in metrics["runs"])
    assert len(metrics["runs"][0]["per_class_accuracy"]) == len(model.class_names)
    from PIL import Image

    grid = Image.open(tmp_path / "fig" / "samples_2steps.png")
    assert grid.size[1] == len(model.class_names) * (8 * 3 + 1)
    assert len(class_captions(model, 2)) == 2 * len(model.class_names)
