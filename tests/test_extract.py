"""Extraction into the on-disk store: exact tokens, early stopping, masking, exact resume, CLI."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import transformers as T

from common.activations.extract import extract, main, probe_sites, window_batches
from common.activations.store import ActivationStore, ActivationStoreWriter
from common.models import load_model

D, VOCAB, SEQ = 32, 64, 8


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return T.LlamaForCausalLM(config).eval().requires_grad_(False)


def _batches(n: int = 4, batch: int = 3) -> list[dict[str, torch.Tensor]]:
    """Deterministic token batches; the second row of each batch has 3 positions of padding."""
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
        mask = torch.ones(batch, SEQ, dtype=torch.long)
        mask[1, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _writer(root, d=D, shard_tokens=10, **meta) -> ActivationStoreWriter:
    return ActivationStoreWriter(
        root, d=d, dtype="float32", shard_tokens=shard_tokens, metadata={"test": 1, **meta}
    )


def _expected(model, batches, layer: int, drop_first: int = 1) -> torch.Tensor:
    rows = []
    for b in batches:
        with torch.no_grad():
            h = model(**b, output_hidden_states=True).hidden_states[layer + 1]
        keep = b["attention_mask"].bool()
        keep[:, :drop_first] = False
        rows.append(h[keep])
    return torch.cat(rows)


def test_extract_stores_kept_tokens_of_several_sites(llama, tmp_path):
    batches = _batches()
    stores = {s: _writer(tmp_path / s, site=s) for s in ("resid_post.0", "resid_post.2")}
    result = extract(llama, batches, list(stores), stores, drop_first=1, progress=False)
    n_expected = len(batches) * (3 * SEQ - 3 - 3)  # minus padding, minus position 0 of 3 rows
    assert result.tokens == {"resid_post.0": n_expected, "resid_post.2": n_expected}
    for layer in (0, 2):
        stored = ActivationStore(tmp_path / f"resid_post.{layer}").tensor()
        torch.testing.assert_close(stored, _expected(llama, batches, layer), rtol=0, atol=1e-6)


def test_forward_stops_after_the_deepest_site(llama, tmp_path):
    calls: Counter[str] = Counter()
    modules = {f"layer{i}": layer for i, layer in enumerate(llama.model.layers)}
    modules |= {"norm": llama.model.norm, "lm_head": llama.lm_head}
    handles = [
        m.register_forward_hook(lambda *_, name=name: calls.update([name]))
        for name, m in modules.items()
    ]
    try:
        sites = ["attn_z.0", "mlp_out.1"]
        stores = {s: _writer(tmp_path / s.replace(".", "_"), site=s) for s in sites}
        extract(llama, _batches(3), sites, stores, progress=False)
    finally:
        for h in handles:
            h.remove()
    # layer 1 starts, its MLP fires the last hook, and nothing after it runs
    assert calls["layer0"] == 3
    assert calls["layer1"] == 0  # stopped inside block 1, before it returned
    assert calls["layer2"] == calls["layer3"] == calls["norm"] == calls["lm_head"] == 0


def test_n_tokens_cap_and_interrupted_run_resume_exactly(llama, tmp_path):
    batches = _batches(6)
    reference = {"resid_post.1": _writer(tmp_path / "ref", site="x")}
    extract(llama, batches, ["resid_post.1"], reference, n_tokens=57, progress=False)
    ref = ActivationStore(tmp_path / "ref").tensor()
    assert len(ref) == 57

    def crashing():
        for i, b in enumerate(batches):
            if i == 3:
                raise KeyboardInterrupt
            yield b

    root = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        extract(
            llama,
            crashing(),
            ["resid_post.1"],
            {"resid_post.1": _writer(root, site="x")},
            n_tokens=57,
            progress=False,
        )
    writer = _writer(root, site="x")  # re-open: finished shards only (3 batches = 54 tokens)
    assert writer.tokens_written == 50
    result = extract(
        llama, batches, ["resid_post.1"], {"resid_post.1": writer}, n_tokens=57, progress=False
    )
    assert result.batches_skipped == 2  # batches 0-1 (36 tokens) were stored, batch 2 straddles
    assert result.batches_run == 2 and result.tokens["resid_post.1"] == 57
    torch.testing.assert_close(ActivationStore(root).tensor(), ref, rtol=0, atol=0)


def test_bad_inputs_fail_clearly(llama, tmp_path):
    with pytest.raises(ValueError, match=r"open the writer with d=48"):
        extract(
            llama,
            _batches(1),
            ["mlp_hidden.0"],
            {"mlp_hidden.0": _writer(tmp_path / "a")},
            progress=False,
        )
    with pytest.raises(ValueError, match=r"valid sites: resid_post\.\{0\.\.3\}"):
        extract(
            llama, _batches(1), ["resid.0"], {"resid.0": _writer(tmp_path / "b")}, progress=False
        )
    with pytest.raises(ValueError, match="no store given"):
        extract(llama, _batches(1), ["resid_post.0"], {}, progress=False)
    assert probe_sites(llama, ["mlp_hidden.3", "attn_z.1"], _batches(1)[0]) == {
        "mlp_hidden.3": 48,
        "attn_z.1": 32,
    }


def test_efficientnet_features_give_7x7_tokens_per_image(tmp_path):
    loaded = load_model("efficientnet-lite0")
    images = loaded.preprocess(
        torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    )
    fc_calls = Counter()
    handle = loaded.model._fc.register_forward_hook(lambda *_: fc_calls.update(["fc"]))
    stores = {"features": _writer(tmp_path / "f", d=1280, shard_tokens=64)}
    try:
        result = extract(loaded, [images], ["features"], stores, progress=False)
    finally:
        handle.remove()
    assert result.tokens["features"] == 2 * 7 * 7 and fc_calls["fc"] == 0
    with torch.no_grad():
        fmap = loaded.model.extract_features(images)  # (2, 1280, 7, 7)
    expected = fmap.permute(0, 2, 3, 1).reshape(-1, 1280)
    torch.testing.assert_close(ActivationStore(tmp_path / "f").tensor(), expected)


def test_vit_images_drop_the_cls_token(tmp_path):
    config = T.CLIPVisionConfig(
        hidden_size=D,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    model = T.CLIPVisionModel(config).eval()
    images = torch.randn(3, 3, 32, 32)
    stores = {"resid_post.0": _writer(tmp_path / "v")}
    extract(model, [images[:2], images[2:]], ["resid_post.0"], stores, progress=False)
    with torch.no_grad():
        h = model(pixel_values=images, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(
        ActivationStore(tmp_path / "v").tensor(), h[:, 1:].reshape(-1, D), rtol=0, atol=1e-5
    )


def test_window_batches_are_fixed_slices():
    ids = torch.arange(50).view(10, 5)
    keep = ids % 2 == 0
    got = list(window_batches(ids, keep, 4))
    assert [len(b["input_ids"]) for b in got] == [4, 4, 2]
    assert torch.equal(torch.cat([b["keep"] for b in got]), keep)


def test_cli_extracts_minilm_on_wordnet_and_resumes(tmp_path, capsys):
    out = tmp_path / "acts"
    argv = [
        "--model",
        "minilm-l6",
        "--sites",
        "resid_post.2,attn_z.1",
        "--corpus",
        "wordnet",
        "--max-docs",
        "300",
        "--n-tokens",
        "300",
        "--context-len",
        "32",
        "--batch-size",
        "4",
        "--shard-tokens",
        "128",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    summary = json.loads((out / "extraction.json").read_text())
    assert summary["sites"] == {
        "resid_post.2": {"d": 384, "n_tokens": 300},
        "attn_z.1": {"d": 384, "n_tokens": 300},
    }
    store = ActivationStore(out / "resid_post.2")
    store.verify()
    assert store.metadata["model"] == "minilm-l6" and store.metadata["site"] == "resid_post.2"
    assert store.metadata["drop_separators"] is True and len(store) == 300
    assert main(argv) == 0  # complete stores: nothing to do
    assert json.loads((out / "extraction.json").read_text())["batches_run"] == 0
