"""Model loading and named hook sites: tiny random transformers saved to disk, and the real assets.

The tiny models (2 layers, d=32) go through the same ``load_model(path)`` code path as hub models;
sites are checked against quantities recomputed by hand from the model's own weights.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import transformers as T

from common.models import list_sites, load_model, resolve_site
from common.models.loading import DEFAULT_CACHE_DIR, SMOLLM2_CACHE_NAME, convert_smollm2
from common.models.sites import block_list

D, HEADS, FF, VOCAB = 32, 4, 48, 64
TINY_CONFIGS = {
    "llama": lambda: T.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
    ),
    "gpt2": lambda: T.GPT2Config(
        vocab_size=VOCAB,
        n_embd=D,
        n_layer=2,
        n_head=HEADS,
        n_positions=64,
        n_inner=FF,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "gpt_neox": lambda: T.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
    ),
    "bert": lambda: T.BertConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
    ),
    "gemma3_text": lambda: T.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        head_dim=D // HEADS,
    ),
    "clip": lambda: T.CLIPConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": D,
            "intermediate_size": FF,
            "num_hidden_layers": 2,
            "num_attention_heads": HEADS,
        },
        vision_config={
            "hidden_size": D,
            "intermediate_size": FF,
            "num_hidden_layers": 2,
            "num_attention_heads": HEADS,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    ),
}
FAMILY = {
    "llama": "causal_lm",
    "gpt2": "causal_lm",
    "gpt_neox": "causal_lm",
    "bert": "text_encoder",
    "gemma3_text": "causal_lm",
    "clip": "clip_vision",
}


def _build(kind: str) -> torch.nn.Module:
    config = TINY_CONFIGS[kind]()
    if kind == "clip":
        return T.CLIPModel(config)
    if kind == "bert":
        return T.BertModel(config)
    return T.AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    torch.manual_seed(0)
    paths = {}
    for kind in TINY_CONFIGS:
        folder = tmp_path_factory.mktemp(kind)
        _build(kind).save_pretrained(folder)
        paths[kind] = str(folder)
    return paths


def _inputs(loaded, batch: int = 2, seq: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if loaded.family == "clip_vision":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)}


def _capture(model, sites, inputs) -> tuple[dict[str, torch.Tensor], object]:
    got: dict[str, torch.Tensor] = {}
    handles = [resolve_site(model, s).register(lambda x, s=s: got.__setitem__(s, x)) for s in sites]
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return got, out


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_load_by_path_gives_frozen_fp32_model(tiny_paths, kind):
    loaded = load_model(tiny_paths[kind])
    assert loaded.family == FAMILY[kind]
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in loaded.model.parameters())
    assert len(loaded.revision) == 64 and int(loaded.revision, 16) >= 0  # sha256 of the weights
    assert loaded.tokenizer is None  # no tokenizer files were saved
    if kind == "clip":
        assert type(loaded.model).__name__ == "CLIPVisionModel"
        assert loaded.preprocess(torch.full((1, 3, 4, 4), 0.5)).shape == (1, 3, 4, 4)


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_every_site_resolves_with_expected_shape(tiny_paths, kind):
    loaded = load_model(tiny_paths[kind])
    sites = list_sites(loaded.model)
    assert len(sites) == 4 * 2
    inputs = _inputs(loaded)
    got, _ = _capture(loaded.model, sites, inputs)
    assert set(got) == set(sites)
    tokens = 1 + (32 // 8) ** 2 if kind == "clip" else 6  # CLS + patches
    for site, x in got.items():
        width = FF if site.startswith("mlp_hidden") else D
        assert tuple(x.shape) == (2, tokens, width), site


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_resid_post_equals_hidden_states(tiny_paths, kind):
    """resid_post.L == hidden_states[L + 1]; the last one of a pre-LN model is before ln_final."""
    loaded = load_model(tiny_paths[kind])
    n = len(block_list(loaded.model))
    got, out = _capture(loaded.model, [f"resid_post.{i}" for i in range(n)], _inputs(loaded))
    hidden = out.hidden_states
    assert len(hidden) == n + 1
    for i in range(n - 1):
        torch.testing.assert_close(got[f"resid_post.{i}"], hidden[i + 1], rtol=0, atol=1e-6)
    last = got[f"resid_post.{n - 1}"]
    if kind in ("bert", "clip"):  # BERT: post-LN; CLIP: post_layernorm acts on the pooled CLS only
        torch.testing.assert_close(last, hidden[n], rtol=0, atol=1e-6)
    else:
        final_norm = {
            "llama": "model.norm",
            "gemma3_text": "model.norm",
            "gpt2": "transformer.ln_f",
            "gpt_neox": "gpt_neox.final_layer_norm",
        }[kind]
        with torch.no_grad():
            normed = loaded.model.get_submodule(final_norm)(last)
        torch.testing.assert_close(normed, hidden[n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "clip"])
def test_sites_add_up_to_the_residual_stream(tiny_paths, kind):
    """Pre-LN block: x_{L+1} = x_L + W_O z_L + mlp_out_L, and mlp_out_L = W_V mlp_hidden_L."""
    loaded = load_model(tiny_paths[kind])
    model = loaded.model
    got, out = _capture(model, list_sites(model), _inputs(loaded))
    w_o = {"llama": "self_attn.o_proj", "gpt2": "attn.c_proj", "clip": "self_attn.out_proj"}[kind]
    w_v = {"llama": "mlp.down_proj", "gpt2": "mlp.c_proj", "clip": "mlp.fc2"}[kind]
    x = out.hidden_states[0]
    with torch.no_grad():
        for i, block in enumerate(block_list(model)):
            attn = block.get_submodule(w_o)(got[f"attn_z.{i}"])
            torch.testing.assert_close(
                x + attn + got[f"mlp_out.{i}"], got[f"resid_post.{i}"], rtol=0, atol=1e-5
            )
            torch.testing.assert_close(
                block.get_submodule(w_v)(got[f"mlp_hidden.{i}"]),
                got[f"mlp_out.{i}"],
                rtol=0,
                atol=1e-5,
            )
            x = got[f"resid_post.{i}"]


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head) + causal mask) v for (B, H, T, d_head); heads concatenated."""
    t = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    z = scores.softmax(-1) @ v
    return z.transpose(1, 2).reshape(q.shape[0], t, -1)


def test_attn_z_equals_concatenated_heads_by_hand_gpt2(tiny_paths):
    loaded = load_model(tiny_paths["gpt2"])
    model = loaded.model
    inputs = _inputs(loaded)
    got, out = _capture(model, ["attn_z.1"], inputs)
    block = model.transformer.h[1]
    b, t = inputs["input_ids"].shape
    with torch.no_grad():
        q, k, v = block.attn.c_attn(block.ln_1(out.hidden_states[1])).split(D, dim=-1)
        heads = [y.view(b, t, HEADS, D // HEADS).transpose(1, 2) for y in (q, k, v)]
        z = _causal_attention(*heads)
    torch.testing.assert_close(got["attn_z.1"], z, rtol=0, atol=1e-5)


def test_attn_z_equals_concatenated_heads_by_hand_llama(tiny_paths):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    loaded = load_model(tiny_paths["llama"])
    model = loaded.model
    inputs = _inputs(loaded)
    got, out = _capture(model, ["attn_z.1"], inputs)
    layer = model.model.layers[1]
    attn = layer.self_attn
    b, t = inputs["input_ids"].shape
    hd, kv = D // HEADS, 2
    with torch.no_grad():
        h = layer.input_layernorm(out.hidden_states[1])
        q = attn.q_proj(h).view(b, t, HEADS, hd).transpose(1, 2)
        k = attn.k_proj(h).view(b, t, kv, hd).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, kv, hd).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(t)[None].expand(b, t))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = (y.repeat_interleave(HEADS // kv, dim=1) for y in (k, v))  # grouped-query heads
        z = _causal_attention(q, k, v)
    torch.testing.assert_close(got["attn_z.1"], z, rtol=0, atol=1e-5)


def test_unknown_site_and_layer_list_valid_sites(tiny_paths):
    model = load_model(tiny_paths["llama"]).model
    with pytest.raises(ValueError, match=r"unknown site 'resid_pre.0'.*resid_post\.\{0\.\.1\}"):
        resolve_site(model, "resid_pre.0")
    with pytest.raises(ValueError, match=r"layer 2 out of range.*attn_z\.\{0\.\.1\}"):
        resolve_site(model, "mlp_out.2")
    with pytest.raises(ValueError, match="no hook-site table for model_type 'opt'"):
        list_sites(
            T.OPTForCausalLM(
                T.OPTConfig(
                    vocab_size=VOCAB,
                    hidden_size=D,
                    ffn_dim=FF,
                    num_hidden_layers=1,
                    num_attention_heads=HEADS,
                    word_embed_proj_dim=D,
                )
            )
        )


def test_unknown_model_names_fail_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(OSError, match=r"not a built-in model \(valid: smollm2-135m.*Did you mean"):
        load_model("smollm2")
    with pytest.raises(OSError, match="downloaded once on a machine with internet"):
        load_model("EleutherAI/pythia-70m-not-cached")


def test_minilm_loads_offline_with_tokenizer():
    loaded = load_model("minilm-l6")
    assert loaded.family == "text_encoder" and loaded.metadata["model_type"] == "bert"
    ids = loaded.tokenizer(["a small test"], return_tensors="pt")
    got, out = _capture(loaded.model, ["resid_post.5", "attn_z.0"], dict(ids))
    torch.testing.assert_close(got["resid_post.5"], out.last_hidden_state, rtol=0, atol=1e-6)
    assert got["attn_z.0"].shape[-1] == 384


def test_efficientnet_sites_are_spatial():
    loaded = load_model("efficientnet-lite0")
    sites = list_sites(loaded.model)
    assert sites[-1] == "features" and sites[0] == "block.0" and len(sites) == 17
    x = loaded.preprocess(torch.rand(1, 3, 224, 224))
    got: dict[str, torch.Tensor] = {}
    handles = [
        resolve_site(loaded.model, s).register(lambda t, s=s: got.__setitem__(s, t))
        for s in ("block.3", "features")
    ]
    with torch.no_grad():
        reference = loaded.model.extract_features(x)
    for h in handles:
        h.remove()
    torch.testing.assert_close(got["features"], reference)  # head activation applied by the site
    assert got["features"].shape == (1, 1280, 7, 7)
    with pytest.raises(ValueError, match=r"block\.\{0\.\.15\}, features"):
        resolve_site(loaded.model, "block.16")


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory: pytest.TempPathFactory):
    """The dequantized SmolLM2: the repo cache if a conversion is there, else converted once."""
    default = DEFAULT_CACHE_DIR / SMOLLM2_CACHE_NAME
    cache = (
        DEFAULT_CACHE_DIR
        if (default / "conversion.json").is_file()
        else (tmp_path_factory.mktemp("models"))
    )
    start = time.perf_counter()
    convert_smollm2(cache)
    print(f"SmolLM2 conversion/check: {time.perf_counter() - start:.1f} s")
    return cache


def test_smollm2_loads_offline_and_position0_norm_dominates(smollm2_folder):
    loaded = load_model("smollm2-135m", cache_dir=smollm2_folder)
    assert loaded.metadata["weights"] == "Q4_1-dequantized"
    assert loaded.family == "causal_lm" and len(list_sites(loaded.model)) == 4 * 30
    text = "The cat sat on the mat because it was warm and the sun was shining."
    ids = torch.tensor([[loaded.tokenizer.bos_token_id, *loaded.tokenizer(text).input_ids]])
    got, _ = _capture(loaded.model, ["resid_post.6", "resid_post.15"], {"input_ids": ids})
    ratios = {}
    for site, x in got.items():
        norms = x[0].norm(dim=-1)
        ratios[site] = (norms[0] / norms[1:].median()).item()
        print(f"{site}: position-0 norm / median other = {ratios[site]:.1f}")
    # Measured: ~8x at layer 6, 100-200x at layers 11-27 (the attention sink).
    assert ratios["resid_post.15"] > 30
    assert ratios["resid_post.6"] > 3


def test_pickle_only_checkpoint_is_refused(tiny_paths, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_paths["gpt2"], folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match="no safetensors weights"):
        load_model(str(folder))
