"""The static feature browser (common.browser): logit lens, pages, index, and a headless Chromium
check that the pages render with no console error and show a clicked latent's contexts.

The Chromium test needs Debian's ``chromium`` (``apt-get install -y chromium``); it is skipped,
saying so, only where no browser is installed.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.autointerp import KeywordJudge, build_records, run_autointerp
from common.autointerp.synthetic import toy_data
from common.browser import (
    build_index,
    build_sae_page,
    direction_logits,
    final_norm,
    image_latents,
    model_logit_tokens,
    scores_from_result,
    top_logit_tokens,
)
from common.browser.headless import HeadlessChromium, find_chromium

SCREENSHOT_COPY = Path("/tmp/browser_screenshot.png")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A text page (toy SAE, explanations, scores, promoted tokens), a vision page and the index,
    with one executed-notebook stand-in."""
    out = tmp_path_factory.mktemp("site")
    toy = toy_data(n_tokens=6000, seed=0)
    records = build_records(toy.acts, toy.token_ids, toy.vocab, toy.sae, n_latents=20,
                            sequence_ids=toy.sequence_ids)  # fmt: skip
    records[0].train[0].tokens[1] = "</script><script>alert(1)</script>"  # must stay text
    result = run_autointerp(records, KeywordJudge(), progress=False, n_boot=100)
    v = len(toy.vocab)
    w_u = np.concatenate([np.eye(v), np.zeros((v, v))], axis=1)  # reads the current word
    logits = top_logit_tokens(toy.sae.W_dec, w_u, toy.vocab,
                              latents=[r.latent for r in records], k=5)  # fmt: skip
    start = time.perf_counter()
    text_page = build_sae_page(
        out / "toy_sae.html", records, title="toy SAE", meta={"model": "toy", "site": "x"},
        logits=logits, scores=scores_from_result(result),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(12, 16, 16, 3))
    patches = np.zeros((12, 4, 4, 3), dtype=np.float32)
    patches[3, 1, 2, 0] = 2.0  # latent 0 fires on one patch of image 3 only
    patches[..., 1:] = rng.uniform(0, 1, size=(12, 4, 4, 2))
    vision = image_latents(images, patches, n_top=4, display_size=32)
    vision_page = build_sae_page(out / "vision.html", vision, title="toy vision SAE")
    notebook = out / "nb" / "paper.html"
    notebook.parent.mkdir()
    notebook.write_text("<!doctype html><title>nb</title><p>executed notebook</p>")
    index = build_index(out, [text_page, ("Vision SAE", vision_page)], notebooks=[notebook])
    seconds = time.perf_counter() - start
    return dict(out=out, text=text_page, vision=vision_page, index=index, records=records,
                toy=toy, seconds=seconds, vision_latents=vision)  # fmt: skip


def _page_data(page: Path) -> dict:
    html = page.read_text()
    raw = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S)
    assert raw, "the page must embed its data"
    return json.loads(raw.group(1))


# --- logit lens ------------------------------------------------------------------------------
def test_direction_logits_fold_in_the_final_norm():
    w_u = torch.eye(3)
    d = torch.tensor([[1.0, 0.8, 0.0]])
    # without the norm weight token 0 wins; a norm weight of 2 on dimension 1 reverses it
    assert direction_logits(d, w_u, None, "none").argmax().item() == 0
    assert direction_logits(d, w_u, torch.tensor([1.0, 2.0, 1.0]), "rms").argmax().item() == 1
    # LayerNorm centres the direction first: a constant direction has no effect
    flat = direction_logits(torch.ones(1, 3), w_u, torch.ones(3), "layer")
    assert torch.allclose(flat, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="share d"):
        direction_logits(torch.ones(1, 4), w_u)


def test_final_norm_and_model_logit_tokens_on_tiny_models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))  # fmt: skip
    with torch.no_grad():
        llama.model.norm.weight.uniform_(0.5, 2.0)
    scale, kind = final_norm(llama)
    assert kind == "rms" and torch.equal(scale, llama.model.norm.weight)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    )
    assert final_norm(gpt2)[1] == "layer"

    directions = torch.randn(4, 16)
    vocab = [f"t{i}" for i in range(50)]
    table = model_logit_tokens(llama, vocab, directions, latents=[2], k=3)
    expected = (directions[2] * llama.model.norm.weight) @ llama.lm_head.weight.T
    assert [t for t, _ in table[2]["promoted"]] == [vocab[i] for i in expected.topk(3).indices]
    assert [t for t, _ in table[2]["suppressed"]] == [vocab[i] for i in (-expected).topk(3).indices]


# --- pages -----------------------------------------------------------------------------------
def test_text_page_holds_the_panels_data(site):
    data = _page_data(site["text"])
    records = site["records"]
    assert [d["id"] for d in data["latents"]] == [r.latent for r in records]
    first = data["latents"][0]
    assert first["top"] and first["quant"] and first["scores"]["real"]["detection"]["auroc"] > 0.9
    assert first["logits"]["p"][0][0].strip() == site["toy"].latent_words[records[0].latent]
    assert first["expl"] == records[0].explanation
    assert "</script><script>alert(1)</script>" in first["top"][0]["t"]  # round-trips as text
    assert len(first["top"]) <= 10 and len(first["quant"]) <= 10
    html = site["text"].read_text()
    assert not re.search(r'(src|href)="(https?:)?//', html), "no external resource"
    size = site["text"].stat().st_size
    assert size < 400_000, f"the toy page is {size} bytes"
    print(f"\ntoy pages built in {site['seconds']:.2f} s; text page {size / 1e3:.0f} kB")


def test_vision_page_and_heatmaps(site):
    from PIL import Image

    latent0 = site["vision_latents"][0]
    assert [im.index for im in latent0.top] == [3]  # the only image where it fires
    overlay = Image.open(io.BytesIO(base64.b64decode(latent0.top[0].overlay.split(",", 1)[1])))
    a = np.asarray(overlay.convert("RGB")).astype(int)
    assert overlay.size == (32, 32)
    hot, cold = a[8:16, 16:24], a[:8, :8]  # patch (1, 2) of a 4x4 grid on 32 px
    assert (hot[..., 0] - hot[..., 1]).mean() > 100 and abs(cold[..., 0] - cold[..., 1]).mean() < 60
    data = _page_data(site["vision"])
    assert data["latents"][1]["images"] and data["latents"][1]["freq"] > 0


def test_index_links_pages_and_notebooks_relatively(site):
    html = site["index"].read_text()
    hrefs = re.findall(r'href="([^"]+)"', html)
    assert "toy_sae.html" in hrefs and "vision.html" in hrefs and "nb/paper.html" in hrefs
    for h in hrefs:
        if not h.startswith("data:"):
            assert (site["out"] / h).is_file()
    assert "20 latents" in html or "latents shown" in html
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_index(site["out"], [site["out"] / "missing.html"])
    with pytest.raises(ValueError, match="end in .html"):
        build_sae_page(site["out"] / "x.txt", site["records"], title="x")


# --- in a real browser -------------------------------------------------------------------------
@pytest.mark.skipif(find_chromium() is None,
                    reason="no Chromium installed: apt-get install -y chromium")  # fmt: skip
def test_pages_render_in_headless_chromium(site, tmp_path):
    records = site["records"]
    target = records[2]
    word = site["toy"].latent_words[target.latent]
    with HeadlessChromium(width=1280, height=900) as browser:
        index = browser.open(site["index"].as_uri())
        assert index.evaluate("document.querySelectorAll('#pages a').length") == 2
        index.click("#pages a")  # follow the link to the text page
        index.browser.wait_event(index.session, "Page.loadEventFired", 30)
        assert index.evaluate("location.pathname").endswith("toy_sae.html")

        page = browser.open(site["text"].as_uri())
        assert page.evaluate("document.querySelectorAll('#list li').length") == len(records)
        page.click(f'#list li[data-id="{target.latent}"]')
        deadline = time.monotonic() + 10
        while page.evaluate("location.hash") != f"#latent-{target.latent}":
            assert time.monotonic() < deadline, "the click did not select the latent"
            time.sleep(0.05)
        heading = page.evaluate("document.querySelector('#panel h2').textContent")
        assert heading.startswith(f"Latent {target.latent}")
        contexts = page.evaluate(
            "Array.from(document.querySelectorAll('#panel .ctx')).map(e => e.textContent)"
        )
        assert len(contexts) >= 5 and all(word in c for c in contexts[:5])
        highlighted = page.evaluate(
            "Array.from(document.querySelectorAll('#panel .ctx .tok'))"
            ".filter(e => e.style.background).map(e => e.textContent.trim())"
        )
        assert highlighted and set(highlighted) == {word}
        assert page.evaluate("document.querySelector('#panel svg rect') !== null")  # histogram
        assert page.evaluate("document.body.textContent.includes('alert(1)')")  # as text only
        shot = page.screenshot(tmp_path / "browser_text.png")
        page.evaluate("document.getElementById('filter').value = 'zzz-nothing'")
        page.evaluate("document.getElementById('filter').dispatchEvent(new Event('input'))")
        assert page.evaluate("document.querySelectorAll('#list li').length") == 0

        vision = browser.open(site["vision"].as_uri())
        loaded = vision.evaluate(
            "Array.from(document.querySelectorAll('#panel img')).every(i => i.naturalWidth > 0)"
        )
        assert loaded and vision.evaluate("document.querySelectorAll('#panel img').length") >= 2
        vision.screenshot(tmp_path / "browser_vision.png")
        for p in (index, page, vision):
            assert p.errors == [], p.errors
            assert all(u.startswith(("file:", "data:", "about:")) for u in p.requests), p.requests
    assert shot.stat().st_size > 10_000
    try:
        shutil.copy(shot, SCREENSHOT_COPY)
    except OSError:
        pass  # the copy is a convenience for reports; the test's own file is in tmp_path
