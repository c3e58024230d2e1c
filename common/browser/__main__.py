"""``python -m common.browser``: build feature-browser pages from saved records, and the index.

    python -m common.browser --records runs/autointerp/records.json \\
        --result metrics/autointerp.json --notebooks papers/07_topk/topk.html --out site

One page per method found in the records (``common.autointerp.records.save_records``), with the
explanations and scores of ``--result`` (``AutointerpResult.save``) where given, and an
``index.html`` linking the pages and the executed notebooks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m common.browser", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--records", action="append", required=True, help="records JSON (repeatable)")
    p.add_argument("--result", help="autointerp result JSON (explanations and scores)")
    p.add_argument("--notebooks", nargs="*", default=[], help="executed notebook .html files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--title", default="SAE feature browser")
    p.add_argument("--max-latents", type=int, default=200)
    p.add_argument("--max-contexts", type=int, default=10)
    args = p.parse_args(argv)

    from common.autointerp.records import load_records
    from common.browser.build import build_index, build_sae_page, scores_from_result, slug

    start = time.perf_counter()
    rows, explanations = [], {}
    if args.result:
        saved = json.loads(Path(args.result).read_text())
        rows = saved.get("rows", [])
        explanations = saved.get("explanations", {}).get("real", {})
    out = Path(args.out)
    pages = []
    for path in args.records:
        records = load_records(path)
        for method in dict.fromkeys(r.method for r in records):
            recs = [r for r in records if r.method == method]
            expl = {r.latent: explanations[f"{method}/{r.latent}"] for r in recs
                    if f"{method}/{r.latent}" in explanations}  # fmt: skip
            page = build_sae_page(
                out / f"{slug(Path(path).stem + '_' + method)}.html", recs, title=method,
                scores=scores_from_result(rows, method) if rows else None, explanations=expl,
                max_latents=args.max_latents, max_contexts=args.max_contexts,
            )  # fmt: skip
            pages.append((method, page))
    index = build_index(out, pages, notebooks=[Path(n) for n in args.notebooks], title=args.title)
    size = sum(f.stat().st_size for f in out.glob("*.html"))
    print(f"{index}: {len(pages)} pages, {size / 1e6:.2f} MB, {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
