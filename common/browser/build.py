"""Build the static feature browser: one self-contained HTML page per SAE, and an index page.

    from common.browser import build_sae_page, build_index
    page = build_sae_page("site/smollm2_resid6.html", records, title="SmolLM2 resid_post.6 TopK",
                          logits=model_logit_tokens(model, tok, sae.W_dec, latents=ids),
                          scores=scores_from_result(result))
    build_index("site", [page], notebooks=["papers/07_topk/topk.html"])

A latent's panel shows its firing frequency, activation histogram, top contexts and contexts
across activation quantiles with per-token highlighting, the close negatives, the output tokens
its decoder direction promotes and suppresses (``logit_lens``), the explanation and its scores
(``common.autointerp``), and for vision latents the top images with patch heat-maps
(``vision.image_latents``). Records are ``common.autointerp.records.LatentRecord`` (text) or
``vision.ImageLatent``; any direction basis works. The page is one file (data as inline JSON,
inline CSS and JS, images as data URIs): it opens from disk, needs no server and makes no request.
Pages stay small: ``max_latents`` and ``max_contexts`` cap what is written.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.autointerp.records import Context, LatentRecord
from common.browser import templates
from common.browser.vision import ImageLatent

LogitTable = Mapping[int, Mapping[str, Sequence[tuple[str, float]]]]
ScoreTable = Mapping[int, Mapping[str, Mapping[str, Mapping[str, float]]]]


def _env() -> Any:
    import jinja2

    return jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)


def _script_json(obj: Any) -> str:
    """JSON safe inside ``<script>``: no ``</`` or ``<!--`` can end or confuse the element."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def _ctx(c: Context) -> dict[str, Any]:
    return {"t": list(c.tokens), "a": [round(float(a), 3) for a in c.acts]}


def scores_from_result(result: Any, method: str | None = None) -> dict[int, dict[str, Any]]:
    """``{latent: {explanation kind: {scorer: metrics}}}`` from an ``AutointerpResult`` (or its
    ``rows``), for one ``method`` (default: every row; give it when several bases were scored)."""
    rows = result.rows if hasattr(result, "rows") else result
    out: dict[int, dict[str, Any]] = {}
    for r in rows:
        if method is not None and r["method"] != method:
            continue
        keep = ("auroc", "balanced_accuracy", "auroc_close")
        metrics = {k: r[k] for k in keep if k in r}
        out.setdefault(int(r["latent"]), {}).setdefault(r["explanation"], {})[r["scorer"]] = metrics
    return out


def _latent_data(
    rec: LatentRecord | ImageLatent,
    logits: LogitTable | None,
    scores: ScoreTable | None,
    max_contexts: int,
) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": int(rec.latent),
        "method": rec.method,
        "freq": float(rec.frequency),
        "max": float(rec.max_activation),
        "expl": rec.explanation,
        "hist": list(rec.hist_counts),
        "edges": [rec.hist_edges[0], rec.hist_edges[-1]] if rec.hist_edges else [0.0, 0.0],
    }
    if isinstance(rec, LatentRecord):
        n_top = min(max_contexts, int(rec.extra.get("n_top", len(rec.train))))
        by_act = sorted(rec.train, key=lambda c: -c.max_act)
        d["thr"] = float(rec.threshold)
        d["top"] = [_ctx(c) for c in by_act[:n_top]]
        quant = sorted(rec.test, key=lambda c: -c.max_act)
        d["quant"] = [_ctx(c) for c in quant[:max_contexts]]
        d["close"] = [_ctx(c) for c in rec.close_negatives[: max(2, max_contexts // 3)]]
        if rec.negatives_fallback:
            d["note"] = "few contexts below the threshold: negatives are the least-activating"
    else:
        d["thr"] = 0.0
        d["images"] = [
            {"img": im.image, "ov": im.overlay, "a": im.max_act, "i": im.index}
            for im in rec.top[:max_contexts]
        ]
    if logits is not None and int(rec.latent) in logits:
        table = logits[int(rec.latent)]
        d["logits"] = {"p": [list(x) for x in table["promoted"]],
                       "s": [list(x) for x in table["suppressed"]]}  # fmt: skip
    if scores is not None and int(rec.latent) in scores:
        d["scores"] = scores[int(rec.latent)]
    return _finite(d)


def build_sae_page(
    path: str | Path,
    records: Sequence[LatentRecord | ImageLatent],
    *,
    title: str,
    meta: Mapping[str, Any] | None = None,
    logits: LogitTable | None = None,
    scores: ScoreTable | None = None,
    explanations: Mapping[int, str] | None = None,
    max_latents: int | None = 200,
    max_contexts: int = 10,
    index_href: str | None = "index.html",
) -> Path:
    """Write one SAE's page to ``path`` (an ``.html`` file) and return the path.

    ``records``: the latents to show (the first ``max_latents``); ``meta``: key/values for the
    header (model, site, architecture, tokens, ...); ``logits``: promoted / suppressed tokens per
    latent (``logit_lens.top_logit_tokens``); ``scores``: per latent explanation scores
    (:func:`scores_from_result`); ``explanations`` overrides ``record.explanation``;
    ``max_contexts`` caps the contexts (or images) per section.
    """
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"the page path must end in .html, got {path}")
    if not records:
        raise ValueError("no latent to show: pass at least one record")
    shown = list(records)[: max_latents or None]
    latents = []
    for rec in shown:
        d = _latent_data(rec, logits, scores, max_contexts)
        if explanations and int(rec.latent) in explanations:
            d["expl"] = explanations[int(rec.latent)]
        latents.append(d)
    import markupsafe

    html = (
        _env()
        .from_string(templates.SAE_PAGE)
        .render(
            title=title,
            css=markupsafe.Markup(templates.CSS),
            meta=[(str(k), str(v)) for k, v in (meta or {}).items()],
            n_latents=len(latents),
            index_href=index_href,
            data=markupsafe.Markup(_script_json({"title": title, "latents": latents})),
        )
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


@dataclass
class _Link:
    name: str
    href: str
    summary: str = ""


def _href(target: Path, base: Path) -> str:
    rel = os.path.relpath(target.resolve(), base.resolve())
    return "/".join(rel.split(os.sep))


def _page_summary(page: Path) -> str:
    """``N latents · meta`` read back from a page this module wrote."""
    text = page.read_text(encoding="utf-8", errors="replace")[:20000]
    m = re.search(r'<div class="meta">(.*?)</div>', text, flags=re.S)
    if not m:
        return ""
    plain = re.sub(r"<[^>]+>", "", m.group(1)).replace("&larr; index", "")
    import html as html_lib

    return " ".join(html_lib.unescape(plain).split()).strip(" ·")


def build_index(
    out_dir: str | Path,
    pages: Sequence[str | Path | tuple[str, str | Path]],
    *,
    notebooks: Sequence[str | Path | tuple[str, str | Path]] = (),
    title: str = "SAE feature browser",
    subtitle: str = "",
) -> Path:
    """Write ``<out_dir>/index.html`` linking the SAE pages and executed notebook HTML files.

    Each entry is a path or ``(name, path)``; links are relative to ``out_dir``, so the folder
    (with the notebooks where they lie relative to it) can be opened from disk or moved whole.
    A missing page or notebook is a FileNotFoundError naming it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def links(entries: Sequence[Any], with_summary: bool) -> list[_Link]:
        result = []
        for entry in entries:
            name, target = entry if isinstance(entry, tuple) else (Path(entry).stem, entry)
            target = Path(target)
            if not target.is_file():
                raise FileNotFoundError(f"{target} does not exist: build it before the index")
            summary = _page_summary(target) if with_summary else ""
            result.append(_Link(str(name), _href(target, out), summary))
        return result

    import markupsafe

    html = (
        _env()
        .from_string(templates.INDEX_PAGE)
        .render(
            title=title,
            subtitle=subtitle,
            css=markupsafe.Markup(templates.CSS),
            pages=links(pages, True),
            notebooks=links(notebooks, False),
        )
    )
    path = out / "index.html"
    path.write_text(html, encoding="utf-8")
    return path


def slug(name: str) -> str:
    """A file-name-safe ``name``: ``SmolLM2 resid_post.6`` -> ``smollm2_resid_post_6``."""
    s = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return s or "page"
