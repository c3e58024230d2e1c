"""Machine-checked paper claims: comparisons of measured metrics, evaluated over seeds.

Each paper folder declares its claims in ``claims.yaml``::

    paper: "Gao et al. 2024 - Scaling and evaluating sparse autoencoders"
    claims:
      - id: topk_lower_fvu_than_relu
        claim: "At matched L0, TopK reaches lower FVU than ReLU+L1"
        paper_value: "Fig. 2: TopK below ReLU on the MSE-vs-L0 frontier"
        lhs: derived.topk_fvu_at_l0          # dotted path into one seed's metrics
        op: "<"                               # <, <=, >, >=, ~=
        rhs: derived.relu_fvu_at_l0           # another path, or a number
        tolerance: 0.0

and its notebook writes ``metrics.json`` as ``{"seeds": {"0": {...}, ...}, "config": {...}}``.
For every seed the claim is the comparison

    ``<``:  lhs < rhs + tol      ``<=``: lhs <= rhs + tol
    ``>``:  lhs > rhs - tol      ``>=``: lhs >= rhs - tol
    ``~=``: |lhs - rhs| <= tol

and the verdict over the seeds is *reproduced* when it holds in every seed, *not reproduced* when it
holds in none, and *inconclusive* when the seeds disagree, when fewer than ``MIN_SEEDS`` seeds were
run, or when a side is missing or not finite in some seed.

    python -m common.claims evaluate --claims papers/07_topk/claims.yaml \
        --metrics metrics/papers/07_topk/metrics.json \
        --verdicts metrics/papers/07_topk/verdicts.json --results papers/07_topk/results.md
    python -m common.claims table --out papers/CLAIMS.md metrics/papers/*/verdicts.json

With ``--readme papers/07_topk/README.md`` the same table is also written into the README, between
the lines ``<!-- results:start -->`` and ``<!-- results:end -->`` (the hand-written prose around
them is kept), so that the README shows the measured numbers next to the paper's.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MIN_SEEDS = 3
OPERATORS = ("<", "<=", ">", ">=", "~=")
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
_ID = re.compile(r"^[a-z0-9_]+$")
_FIELDS = {"id", "claim", "paper_value", "lhs", "op", "rhs", "tolerance"}


class ClaimsError(ValueError):
    """A malformed claims file or metrics file; the message names the file, claim and field."""


@dataclass(frozen=True)
class Claim:
    id: str
    claim: str
    paper_value: str
    lhs: str | float
    op: str
    rhs: str | float
    tolerance: float = 0.0


def load_claims(path: str | Path) -> tuple[str, list[Claim]]:
    """``(paper, claims)`` from a ``claims.yaml``; every field is checked before any evaluation."""
    path = Path(path)
    if not path.exists():
        raise ClaimsError(f"{path}: no such claims file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ClaimsError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("claims"), list) or not doc["claims"]:
        raise ClaimsError(
            f"{path}: expected a mapping with `paper:` and a non-empty `claims:` list"
        )
    claims, seen = [], set()
    for i, raw in enumerate(doc["claims"]):
        where = f"{path}: claims[{i}]"
        if not isinstance(raw, dict):
            raise ClaimsError(f"{where} must be a mapping with fields {sorted(_FIELDS)}")
        unknown = sorted(set(raw) - _FIELDS)
        missing = sorted({"id", "claim", "lhs", "op", "rhs"} - set(raw))
        if unknown or missing:
            raise ClaimsError(f"{where}: unknown fields {unknown}, missing fields {missing}")
        cid = raw["id"]
        if not isinstance(cid, str) or not _ID.match(cid) or cid in seen:
            raise ClaimsError(f"{where}: `id` must be a unique snake_case name, got {cid!r}")
        seen.add(cid)
        if raw["op"] not in OPERATORS:
            raise ClaimsError(
                f"{where} ({cid}): `op` must be one of {OPERATORS}, got {raw['op']!r}"
            )
        for side in ("lhs", "rhs"):
            value = raw[side]
            ok_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (ok_number or (isinstance(value, str) and value)):
                raise ClaimsError(f"{where} ({cid}): `{side}` must be a metric path or a number")
        tol = raw.get("tolerance", 0.0)
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or tol < 0:
            raise ClaimsError(f"{where} ({cid}): `tolerance` must be a number >= 0, got {tol!r}")
        claims.append(
            Claim(
                id=cid,
                claim=str(raw["claim"]),
                paper_value=str(raw.get("paper_value", "")),
                lhs=raw["lhs"],
                op=raw["op"],
                rhs=raw["rhs"],
                tolerance=float(tol),
            )
        )
    return str(doc.get("paper", path.parent.name)), claims


def load_seed_metrics(path: str | Path) -> dict[str, dict[str, Any]]:
    """The ``seeds`` mapping of a paper's metrics JSON: ``{seed: nested metrics}``."""
    path = Path(path)
    if not path.exists():
        raise ClaimsError(f"{path}: no metrics file; run the paper's notebook stage first")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ClaimsError(f"{path} is not valid JSON: {err}") from err
    seeds = doc.get("seeds") if isinstance(doc, dict) else None
    if not isinstance(seeds, dict) or not seeds:
        raise ClaimsError(f"{path}: expected {{'seeds': {{'0': {{...}}, ...}}}}")
    return seeds


def lookup(metrics: dict[str, Any], side: str | float) -> float:
    """A number as is, or the value at a dotted path such as ``derived.topk_fvu_at_l0``."""
    if not isinstance(side, str):
        return float(side)
    node: Any = metrics
    for part in side.split("."):
        if not isinstance(node, dict) or part not in node:
            return math.nan
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        return math.nan
    return float(node)


def holds(lhs: float, op: str, rhs: float, tolerance: float) -> bool:
    """Whether ``lhs op rhs`` holds with ``tolerance`` slack (see the module docstring)."""
    if op == "<":
        return lhs < rhs + tolerance
    if op == "<=":
        return lhs <= rhs + tolerance
    if op == ">":
        return lhs > rhs - tolerance
    if op == ">=":
        return lhs >= rhs - tolerance
    return abs(lhs - rhs) <= tolerance


def _summary(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan}
    return {
        "mean": statistics.fmean(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
    }


def evaluate_claim(claim: Claim, seeds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-seed sides and outcome, their mean ± std, and the verdict over seeds."""
    per_seed = {}
    for seed, metrics in sorted(seeds.items(), key=lambda kv: kv[0]):
        lhs, rhs = lookup(metrics, claim.lhs), lookup(metrics, claim.rhs)
        ok = math.isfinite(lhs) and math.isfinite(rhs)
        per_seed[seed] = {
            "lhs": lhs,
            "rhs": rhs,
            "holds": holds(lhs, claim.op, rhs, claim.tolerance) if ok else None,
        }
    outcomes = [s["holds"] for s in per_seed.values()]
    n_holds = sum(o is True for o in outcomes)
    if len(outcomes) < MIN_SEEDS:
        verdict, why = INCONCLUSIVE, f"only {len(outcomes)} seed(s); at least {MIN_SEEDS} needed"
    elif any(o is None for o in outcomes):
        missing = [s for s, v in per_seed.items() if v["holds"] is None]
        verdict, why = INCONCLUSIVE, f"a side is missing or not finite in seed(s) {missing}"
    elif n_holds == len(outcomes):
        verdict, why = REPRODUCED, f"holds in all {len(outcomes)} seeds"
    elif n_holds == 0:
        verdict, why = NOT_REPRODUCED, f"fails in all {len(outcomes)} seeds"
    else:
        verdict, why = INCONCLUSIVE, f"holds in {n_holds} of {len(outcomes)} seeds"
    return {
        "id": claim.id,
        "claim": claim.claim,
        "paper_value": claim.paper_value,
        "lhs": claim.lhs,
        "op": claim.op,
        "rhs": claim.rhs,
        "tolerance": claim.tolerance,
        "per_seed": per_seed,
        "lhs_summary": _summary([s["lhs"] for s in per_seed.values()]),
        "rhs_summary": _summary([s["rhs"] for s in per_seed.values()]),
        "n_seeds": len(outcomes),
        "n_holds": n_holds,
        "verdict": verdict,
        "why": why,
    }


def evaluate_claims(claims_path: str | Path, metrics_path: str | Path) -> dict[str, Any]:
    """Every claim of a paper folder evaluated on its metrics: the ``verdicts.json`` document."""
    paper, claims = load_claims(claims_path)
    seeds = load_seed_metrics(metrics_path)
    return {
        "paper": paper,
        "folder": Path(claims_path).parent.name,
        "claims": [evaluate_claim(c, seeds) for c in claims],
    }


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4g}"


def _side(side: str | float, summary: dict[str, float]) -> str:
    if not isinstance(side, str):
        return _fmt(float(side))
    return f"{_fmt(summary['mean'])} ± {_fmt(summary['std'])} (`{side}`)"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def results_markdown(verdicts: dict[str, Any], source: str = "") -> str:
    """One paper's results table: claim, the paper's number, ours over seeds, verdict."""
    lines = [
        "<!-- Generated by `python -m common.claims evaluate`; do not edit by hand. -->",
        f"### Claims of {verdicts['paper']}",
        "",
        f"_Each claim is checked per seed on the metrics in `{source}`; mean ± std over seeds._"
        if source
        else "_Each claim is checked per seed; mean ± std over seeds._",
        "",
        "| claim | paper | ours: lhs | op | ours: rhs | verdict |",
        "|:--|:--|:--|:-:|:--|:--|",
    ]
    for c in verdicts["claims"]:
        op = c["op"] + (f" (tol {c['tolerance']:g})" if c["tolerance"] else "")
        lines.append(
            f"| {_cell(c['claim'])} | {_cell(c['paper_value'])} "
            f"| {_side(c['lhs'], c['lhs_summary'])} | {op} "
            f"| {_side(c['rhs'], c['rhs_summary'])} | **{c['verdict']}** ({c['why']}) |"
        )
    return "\n".join(lines) + "\n"


README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def replace_readme_results(readme: str | Path, table: str) -> None:
    """Put ``table`` between the results markers of ``readme``; error if they are missing."""
    readme = Path(readme)
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ClaimsError(
            f"{readme}: add the lines {README_START!r} and {README_END!r} where the generated "
            "results table should go"
        )
    head, tail = text[: start + len(README_START)], text[end:]
    readme.write_text(f"{head}\n{table}{tail}")


def claims_table(verdict_files: list[str | Path]) -> str:
    """The repo-wide table of every paper's claims and verdicts, with counts per verdict."""
    rows, counts = [], {REPRODUCED: 0, NOT_REPRODUCED: 0, INCONCLUSIVE: 0}
    for path in sorted(Path(p) for p in verdict_files):
        doc = json.loads(path.read_text())
        for c in doc["claims"]:
            counts[c["verdict"]] += 1
            rows.append(
                f"| [{doc['folder']}]({doc['folder']}/results.md) | {_cell(c['claim'])} "
                f"| {_cell(c['paper_value'])} | **{c['verdict']}** ({c['why']}) |"
            )
    summary = ", ".join(f"{n} {verdict}" for verdict, n in counts.items())
    return (
        "\n".join(
            [
                "<!-- Generated by `python -m common.claims table`; do not edit by hand. -->",
                "# Every paper claim we check, and whether it reproduced here",
                "",
                f"{sum(counts.values())} claims: {summary}. Each is a comparison of measured"
                " metrics, evaluated per seed (see `common/claims.py`);"
                " the paper folders give the numbers.",
                "",
                "| paper | claim | paper's number | verdict |",
                "|:--|:--|:--|:--|",
                *rows,
            ]
        )
        + "\n"
    )


def _json_safe(value: Any) -> Any:
    """NaN / inf become ``null`` so that verdicts.json is strict JSON (DVC reads it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="one paper's claims -> verdicts.json + results.md")
    ev.add_argument("--claims", required=True)
    ev.add_argument("--metrics", required=True)
    ev.add_argument("--verdicts", required=True)
    ev.add_argument("--results", required=True)
    ev.add_argument("--readme", help="also write the table between the README's results markers")
    tab = sub.add_parser("table", help="all verdicts.json -> one markdown table")
    tab.add_argument("--out", required=True)
    tab.add_argument("verdicts", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.command == "evaluate":
            verdicts = evaluate_claims(args.claims, args.metrics)
            Path(args.verdicts).parent.mkdir(parents=True, exist_ok=True)
            Path(args.verdicts).write_text(json.dumps(_json_safe(verdicts), indent=1) + "\n")
            table = results_markdown(verdicts, source=args.metrics)
            Path(args.results).write_text(table)
            if args.readme:
                replace_readme_results(args.readme, table)
            for c in verdicts["claims"]:
                print(f"{c['verdict']:>15}  {c['id']}  ({c['why']})")
        else:
            Path(args.out).write_text(claims_table(args.verdicts))
    except ClaimsError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
