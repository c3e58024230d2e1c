"""Machine-checked paper claims: comparisons of measured metrics, evaluated over seeds and budgets.

Each paper folder declares its claims in ``claims.yaml``::

    paper: "Gao et al. 2024 - Scaling and evaluating sparse autoencoders"
    claims:
      - id: topk_lower_fvu_than_relu
        claim: "At matched L0, TopK reaches lower FVU than ReLU+L1"
        source: paper                         # paper | control | sanity
        where: "Fig. 2"                       # figure, table or section of the paper
        paper_value: "TopK below ReLU on the MSE-vs-L0 frontier"
        lhs: derived.topk_fvu_at_l0           # dotted path into one seed's metrics
        op: "<"                               # <, <=, >, >=, ~=
        rhs: derived.relu_fvu_at_l0           # another path, or a number
        tolerance: 0                          # 0, {value: 0.02, from: "Table 2: +-0.02"}, or seeds

and its notebook writes ``metrics.json`` as ``{"seeds": {"0": {...}, ...}, "budgets": {"half":
{"seeds": ...}}, "config": {...}}`` (``common.kit``). For every seed the claim is the comparison

    ``<``:  lhs < rhs + tol      ``<=``: lhs <= rhs + tol
    ``>``:  lhs > rhs - tol      ``>=``: lhs >= rhs - tol
    ``~=``: |lhs - rhs| <= tol

and the verdict over the seeds is *reproduced* when it holds in every seed, *not reproduced* when it
holds in none, and *inconclusive* when the seeds disagree, when fewer than ``MIN_SEEDS`` seeds were
run, or when a side is missing or not finite in some seed.

What makes a verdict trustworthy (issue "Verdicts a reviewer can trust"):

* ``source``: ``paper`` claims are the paper's own (headline counts are over these); ``control``
  claims are ours and guard paper claims (``guards: [id, ...]``): when a control does not
  reproduce, the claims it guards are shown as *unsupported*; ``sanity`` checks (a model trained,
  an SAE is sparse) are reported apart and count for nothing.
* A tolerance says where it comes from: ``0`` (none), ``{value, from}`` (the paper's number), or
  ``seeds``: twice the spread of the two sides over seeds, 2 sqrt(sd_lhs^2 + sd_rhs^2).
* Settledness: where the metrics also hold the half-budget runs (``budgets.half``), every claim is
  evaluated there too; a verdict that differs between half and full budget is *not settled* and
  shown with both. Where they do not, settledness is *not checked*.
* ``revised: {original: ..., reason: ...}`` records a definition, threshold or read-out point that
  changed after results were seen; it is shown beside the verdict.

    python -m common.claims evaluate --claims papers/07_topk/claims.yaml \
        --metrics metrics/papers/07_topk/metrics.json \
        --verdicts metrics/papers/07_topk/verdicts.json \
        --results metrics/papers/07_topk/results.md --readme papers/07_topk/README.md
    python -m common.claims table --out papers/CLAIMS.md metrics/papers/*/verdicts.json

With ``--readme`` the same tables are written into the README, between the lines
``<!-- results:start -->`` and ``<!-- results:end -->`` (the prose around them is kept).
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
NOT_SETTLED, UNSUPPORTED = "not settled", "unsupported"
SOURCES = ("paper", "control", "sanity")
_ID = re.compile(r"^[a-z0-9_]+$")
_FIELDS = {
    "id",
    "claim",
    "source",
    "where",
    "paper_value",
    "lhs",
    "op",
    "rhs",
    "tolerance",
    "guards",
    "revised",
}


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
    tolerance: float | str = 0.0  # a number, or "seeds" (from the spread over seeds)
    source: str = "paper"
    where: str = ""
    tolerance_from: str = ""
    guards: tuple[str, ...] = ()
    revised: dict[str, str] | None = None


def _tolerance(raw: Any, where: str) -> tuple[float | str, str]:
    """``(tolerance, where it comes from)`` from a claim's ``tolerance`` field."""
    if raw is None or (isinstance(raw, (int, float)) and not isinstance(raw, bool) and raw == 0):
        return 0.0, ""
    if raw == "seeds":
        return "seeds", "twice the spread of the two sides over seeds"
    if isinstance(raw, dict) and set(raw) == {"value", "from"}:
        value, origin = raw["value"], raw["from"]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            if isinstance(origin, str) and origin.strip():
                return float(value), origin.strip()
    raise ClaimsError(
        f"{where}: `tolerance` must be 0, `seeds`, or {{value: <number > 0>, from: <where the "
        f"number comes from: the paper's figure/table, ...>}} (no bare constant), got {raw!r}"
    )


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
        tol, tol_from = _tolerance(raw.get("tolerance", 0.0), f"{where} ({cid})")
        source = raw.get("source")
        if source not in SOURCES:
            raise ClaimsError(
                f"{where} ({cid}): `source` must be one of {SOURCES} (the paper's own claim, our "
                f"control, or a sanity check), got {source!r}"
            )
        located = raw.get("where")
        if source == "paper" and not (isinstance(located, str) and located.strip()):
            raise ClaimsError(
                f"{where} ({cid}): a paper claim needs `where`: the figure, table or section of "
                "the paper it comes from (e.g. 'Fig. 2', 'Sec. 3.1', 'Abstract')"
            )
        guards = raw.get("guards", [])
        if source != "control" and guards:
            raise ClaimsError(f"{where} ({cid}): only a control claim can have `guards`")
        if not isinstance(guards, list) or not all(isinstance(g, str) for g in guards):
            raise ClaimsError(f"{where} ({cid}): `guards` must be a list of claim ids")
        revised = raw.get("revised")
        if revised is not None and not (
            isinstance(revised, dict)
            and set(revised) == {"original", "reason"}
            and all(isinstance(v, str) and v.strip() for v in revised.values())
        ):
            raise ClaimsError(
                f"{where} ({cid}): `revised` must be {{original: <the claim as first defined>, "
                f"reason: <why it changed after results were seen>}}, got {revised!r}"
            )
        claims.append(
            Claim(
                id=cid,
                claim=str(raw["claim"]),
                paper_value=str(raw.get("paper_value", "")),
                lhs=raw["lhs"],
                op=raw["op"],
                rhs=raw["rhs"],
                tolerance=tol,
                source=source,
                where=str(located or ""),
                tolerance_from=tol_from,
                guards=tuple(guards),
                revised=revised,
            )
        )
    ids = {c.id for c in claims}
    for c in claims:
        unknown = sorted(set(c.guards) - ids)
        if unknown:
            raise ClaimsError(f"{path}: control {c.id} guards unknown claim(s) {unknown}")
    return str(doc.get("paper", path.parent.name)), claims


def load_metrics(path: str | Path) -> dict[str, Any]:
    """A paper's metrics JSON, checked: ``{"seeds": {seed: nested metrics}, "budgets": ...}``."""
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
    return doc


def load_seed_metrics(path: str | Path) -> dict[str, dict[str, Any]]:
    """The ``seeds`` mapping of a paper's metrics JSON: ``{seed: nested metrics}``."""
    return load_metrics(path)["seeds"]


def half_budget_seeds(doc: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The half-budget runs' ``{seed: metrics}``, if the notebook recorded them."""
    half = (doc.get("budgets") or {}).get("half")
    seeds = half.get("seeds") if isinstance(half, dict) else None
    return seeds if isinstance(seeds, dict) and seeds else None


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


def _seed_tolerance(claim: Claim, per_seed: dict[str, dict[str, float]]) -> float:
    """The claim's tolerance; for ``seeds``, 2 sqrt(sd_lhs^2 + sd_rhs^2) over the seeds."""
    if claim.tolerance != "seeds":
        return float(claim.tolerance)
    sds = [_summary([s[side] for s in per_seed.values()])["std"] for side in ("lhs", "rhs")]
    return 2.0 * math.sqrt(sum(sd**2 for sd in sds if math.isfinite(sd)))


def _verdict(outcomes: list[bool | None], per_seed: dict[str, Any]) -> tuple[str, str]:
    n_holds = sum(o is True for o in outcomes)
    if len(outcomes) < MIN_SEEDS:
        return INCONCLUSIVE, f"only {len(outcomes)} seed(s); at least {MIN_SEEDS} needed"
    if any(o is None for o in outcomes):
        missing = [s for s, v in per_seed.items() if v["holds"] is None]
        return INCONCLUSIVE, f"a side is missing or not finite in seed(s) {missing}"
    if n_holds == len(outcomes):
        return REPRODUCED, f"holds in all {len(outcomes)} seeds"
    if n_holds == 0:
        return NOT_REPRODUCED, f"fails in all {len(outcomes)} seeds"
    return INCONCLUSIVE, f"holds in {n_holds} of {len(outcomes)} seeds"


def check_over_seeds(claim: Claim, seeds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-seed sides and outcome, their mean ± std, the tolerance used, the verdict."""
    per_seed: dict[str, dict[str, Any]] = {}
    for seed, metrics in sorted(seeds.items(), key=lambda kv: kv[0]):
        per_seed[seed] = {"lhs": lookup(metrics, claim.lhs), "rhs": lookup(metrics, claim.rhs)}
    tolerance = _seed_tolerance(claim, per_seed)
    for side in per_seed.values():
        ok = math.isfinite(side["lhs"]) and math.isfinite(side["rhs"])
        side["holds"] = holds(side["lhs"], claim.op, side["rhs"], tolerance) if ok else None
    outcomes = [s["holds"] for s in per_seed.values()]
    verdict, why = _verdict(outcomes, per_seed)
    return {
        "per_seed": per_seed,
        "tolerance_used": tolerance,
        "lhs_summary": _summary([s["lhs"] for s in per_seed.values()]),
        "rhs_summary": _summary([s["rhs"] for s in per_seed.values()]),
        "n_seeds": len(outcomes),
        "n_holds": sum(o is True for o in outcomes),
        "verdict": verdict,
        "why": why,
    }


def evaluate_claim(
    claim: Claim,
    seeds: dict[str, dict[str, Any]],
    half: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The claim checked over seeds at the full budget and, given ``half``, at half of it.

    ``status`` is the verdict shown: the full-budget verdict, or *not settled* when the half
    budget gives another one (``settled``: True / False, or None where not checked)."""
    full = check_over_seeds(claim, seeds)
    result: dict[str, Any] = {
        "id": claim.id,
        "claim": claim.claim,
        "source": claim.source,
        "where": claim.where,
        "paper_value": claim.paper_value,
        "lhs": claim.lhs,
        "op": claim.op,
        "rhs": claim.rhs,
        "tolerance": claim.tolerance,
        "tolerance_from": claim.tolerance_from,
        "guards": list(claim.guards),
        "revised": claim.revised,
        **full,
        "half": None,
        "settled": None,
        "status": full["verdict"],
    }
    if half is not None:
        at_half = check_over_seeds(claim, half)
        result["half"] = {k: at_half[k] for k in ("verdict", "why", "lhs_summary", "rhs_summary")}
        result["settled"] = at_half["verdict"] == full["verdict"]
        if not result["settled"]:
            result["status"] = NOT_SETTLED
    return result


def _apply_controls(results: list[dict[str, Any]]) -> None:
    """A control that does not reproduce marks the claims it guards as *unsupported*."""
    by_id = {r["id"]: r for r in results}
    for control in results:
        if control["source"] != "control" or control["status"] == REPRODUCED:
            continue
        for guarded in control["guards"]:
            target = by_id[guarded]
            target.setdefault("failed_controls", []).append(control["id"])
            target["status"] = UNSUPPORTED


def evaluate_claims(claims_path: str | Path, metrics_path: str | Path) -> dict[str, Any]:
    """Every claim of a paper folder evaluated on its metrics: the ``verdicts.json`` document."""
    paper, claims = load_claims(claims_path)
    doc = load_metrics(metrics_path)
    half = half_budget_seeds(doc)
    results = [evaluate_claim(c, doc["seeds"], half) for c in claims]
    _apply_controls(results)
    return {
        "paper": paper,
        "folder": Path(claims_path).parent.name,
        "settledness_checked": half is not None,
        "claims": results,
    }


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4g}"


def _side(side: str | float, summary: dict[str, float]) -> str:
    if not isinstance(side, str):
        return _fmt(float(side))
    return f"{_fmt(summary['mean'])} ± {_fmt(summary['std'])} (`{side}`)"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _tolerance_text(c: dict[str, Any]) -> str:
    if not c["tolerance_used"]:
        return ""
    return f" (tol {c['tolerance_used']:.3g}: {c['tolerance_from']})"


def _status_text(c: dict[str, Any]) -> str:
    text = f"**{c['status']}**"
    if c["status"] == NOT_SETTLED:
        text += f" (full budget: {c['verdict']}, {c['why']}; half: {c['half']['verdict']})"
    elif c["status"] == UNSUPPORTED:
        text += f" ({c['verdict']}, but control(s) {', '.join(c['failed_controls'])} failed)"
    else:
        text += f" ({c['why']})"
    if c.get("revised"):
        text += f'; *revised*: was "{c["revised"]["original"]}" ({c["revised"]["reason"]})'
    return text


def _claim_rows(claims: list[dict[str, Any]], with_where: bool) -> list[str]:
    rows = []
    for c in claims:
        where = f"{_cell(c['where'])}: " if with_where and c["where"] else ""
        rows.append(
            f"| {_cell(c['claim'])} | {where}{_cell(c['paper_value'])} "
            f"| {_side(c['lhs'], c['lhs_summary'])} | {c['op']}{_cell(_tolerance_text(c))} "
            f"| {_side(c['rhs'], c['rhs_summary'])} | {_cell(_status_text(c))} |"
        )
    return rows


def results_markdown(verdicts: dict[str, Any], source: str = "") -> str:
    """One paper's results: its own claims, then our controls and sanity checks apart."""
    settled = (
        "each is also checked at half the training budget (same runs): a verdict that differs is "
        "*not settled*"
        if verdicts.get("settledness_checked")
        else "settledness (half vs full training budget) is *not checked* for this paper yet"
    )
    where = f"the metrics in `{source}`" if source else "the recorded metrics"
    lines = [
        "<!-- Generated by `python -m common.claims evaluate`; do not edit by hand. -->",
        f"### Claims of {verdicts['paper']}",
        "",
        f"_Each claim is checked per seed on {where}; mean ± std over seeds; {settled}._",
        "",
        "| claim | paper | ours: lhs | op | ours: rhs | verdict |",
        "|:--|:--|:--|:-:|:--|:--|",
        *_claim_rows([c for c in verdicts["claims"] if c["source"] == "paper"], True),
    ]
    ours = [c for c in verdicts["claims"] if c["source"] != "paper"]
    if ours:
        lines += [
            "",
            "#### Our controls and sanity checks (not the paper's claims)",
            "",
            "| kind | check | why | ours: lhs | op | ours: rhs | verdict |",
            "|:--|:--|:--|:--|:-:|:--|:--|",
        ]
        for c, row in zip(ours, _claim_rows(ours, False), strict=True):
            guards = f" (guards {', '.join(c['guards'])})" if c["guards"] else ""
            lines.append(f"| {c['source']}{guards} " + row)
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


STATUSES = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_SETTLED, UNSUPPORTED)


def claims_table(verdict_files: list[str | Path]) -> str:
    """The repo-wide tables: the papers' own claims (the headline), then our controls and
    sanity checks, then every revision made after results were seen."""
    paper_rows, other_rows, revisions = [], [], []
    counts = dict.fromkeys(STATUSES, 0)
    other_counts = dict.fromkeys(STATUSES, 0)
    unchecked = []
    for path in sorted(Path(p) for p in verdict_files):
        doc = json.loads(path.read_text())
        link = f"[{doc['folder']}]({doc['folder']}/README.md)"
        if not doc.get("settledness_checked"):
            unchecked.append(doc["folder"])
        for c in doc["claims"]:
            status = _cell(_status_text(c))
            if c["source"] == "paper":
                counts[c["status"]] += 1
                paper_rows.append(
                    f"| {link} | {_cell(c['claim'])} | {_cell(c['where'])} "
                    f"| {_cell(c['paper_value'])} | {status} |"
                )
            else:
                other_counts[c["status"]] += 1
                other_rows.append(f"| {link} | {c['source']} | {_cell(c['claim'])} | {status} |")
            if c.get("revised"):
                revisions.append(
                    f"| {link} | {c['id']} | {_cell(c['revised']['original'])} "
                    f"| {_cell(c['revised']['reason'])} |"
                )

    def summary(numbers: dict[str, int]) -> str:
        return ", ".join(f"{n} {status}" for status, n in numbers.items() if n)

    lines = [
        "<!-- Generated by `python -m common.claims table`; do not edit by hand. -->",
        "# Every paper claim we check, and whether it reproduced here",
        "",
        f"**The papers' own claims: {sum(counts.values())}: {summary(counts)}.** Each is a"
        " comparison of measured metrics, evaluated per seed (`common/claims.py`): *reproduced*"
        " holds in every seed, *not reproduced* in none, *inconclusive* in some; *not settled*:"
        " the verdict at half the training budget differs from the full-budget one; *unsupported*:"
        " a control that guards it failed. The paper folders give the numbers.",
        "",
        f"Settledness is not checked yet for: {', '.join(unchecked)}." if unchecked else "",
        "",
        "| paper | claim | where in the paper | paper's number | verdict |",
        "|:--|:--|:--|:--|:--|",
        *paper_rows,
        "",
        f"## Our controls and sanity checks ({sum(other_counts.values())}:"
        f" {summary(other_counts)})",
        "",
        "Not the papers' claims, and not counted above: controls guard paper claims (a failed"
        " control marks them unsupported), sanity checks say a model trained at all.",
        "",
        "| paper | kind | check | verdict |",
        "|:--|:--|:--|:--|",
        *other_rows,
    ]
    if revisions:
        lines += [
            "",
            "## Revisions made after results were seen",
            "",
            "| paper | claim | first defined as | why it changed |",
            "|:--|:--|:--|:--|",
            *revisions,
        ]
    return "\n".join(lines) + "\n"


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
                print(f"{c['status']:>15}  {c['source']:<7}  {c['id']}  ({c['why']})")
        else:
            Path(args.out).write_text(claims_table(args.verdicts))
    except ClaimsError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
