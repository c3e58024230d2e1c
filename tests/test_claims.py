"""Claims are checked per seed and summarised into a verdict that can come out any of three ways;
sources, controls, tolerances and settledness decide what the headline shows."""

import json
import math

import pytest

from common.claims import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    NOT_SETTLED,
    REPRODUCED,
    UNSUPPORTED,
    ClaimsError,
    claims_table,
    evaluate_claims,
    holds,
    load_claims,
    lookup,
    main,
)

CLAIMS = """
paper: Toy paper
claims:
  - id: a_below_b
    claim: A has lower FVU than B
    source: paper
    where: Fig. 1
    paper_value: "0.1 vs 0.2"
    lhs: a.fvu
    op: "<"
    rhs: b.fvu
  - id: a_near_one
    claim: gamma of A is about 1
    source: paper
    where: Table 2
    lhs: a.gamma
    op: "~="
    rhs: 1.0
    tolerance: {value: 0.05, from: "Table 2 reports 1.00 +- 0.05"}
  - id: b_dead_above_half
    claim: B has many dead latents
    source: paper
    where: Sec. 3
    lhs: b.dead
    op: ">"
    rhs: 0.5
"""


P = "id: x, claim: c, source: paper, where: Fig. 1, lhs: a, op: '<', rhs: 1"


def _write(tmp_path, seeds, claims=CLAIMS, half=None):
    (tmp_path / "claims.yaml").write_text(claims)
    doc = {"seeds": seeds, **({"budgets": {"half": {"seeds": half}}} if half else {})}
    (tmp_path / "metrics.json").write_text(json.dumps(doc))
    return tmp_path / "claims.yaml", tmp_path / "metrics.json"


def _seed(a_fvu, b_fvu, gamma, dead):
    return {"a": {"fvu": a_fvu, "gamma": gamma}, "b": {"fvu": b_fvu, "dead": dead}}


def test_operators_and_tolerance():
    assert holds(1.0, "<", 1.0, 0.1) and not holds(1.0, "<", 1.0, 0.0)
    assert holds(1.0, "<=", 1.0, 0.0) and holds(1.0, ">=", 1.0, 0.0)
    assert holds(0.95, ">", 1.0, 0.1) and not holds(0.95, ">", 1.0, 0.0)
    assert holds(1.04, "~=", 1.0, 0.05) and not holds(1.06, "~=", 1.0, 0.05)


def test_lookup_paths_and_numbers():
    metrics = {"derived": {"x": 2}, "flag": True}
    assert lookup(metrics, "derived.x") == 2.0
    assert lookup(metrics, 3) == 3.0
    assert math.isnan(lookup(metrics, "derived.missing"))
    assert math.isnan(lookup(metrics, "flag"))


def test_three_verdicts(tmp_path):
    seeds = {
        "0": _seed(0.1, 0.2, 1.01, 0.1),
        "1": _seed(0.1, 0.2, 1.20, 0.1),
        "2": _seed(0.1, 0.2, 1.00, 0.1),
    }
    verdicts = evaluate_claims(*_write(tmp_path, seeds))
    by_id = {c["id"]: c for c in verdicts["claims"]}
    assert by_id["a_below_b"]["verdict"] == REPRODUCED
    assert by_id["a_near_one"]["verdict"] == INCONCLUSIVE and by_id["a_near_one"]["n_holds"] == 2
    assert by_id["b_dead_above_half"]["verdict"] == NOT_REPRODUCED
    assert by_id["a_below_b"]["lhs_summary"]["mean"] == pytest.approx(0.1)


def test_too_few_seeds_or_missing_metric_is_inconclusive(tmp_path):
    two = {"0": _seed(0.1, 0.2, 1.0, 0.9), "1": _seed(0.1, 0.2, 1.0, 0.9)}
    verdicts = evaluate_claims(*_write(tmp_path, two))
    assert {c["verdict"] for c in verdicts["claims"]} == {INCONCLUSIVE}
    three = {s: {"a": {"fvu": 0.1, "gamma": 1.0}, "b": {"dead": 0.9}} for s in "012"}
    first = evaluate_claims(*_write(tmp_path, three))["claims"][0]
    assert first["verdict"] == INCONCLUSIVE and "not finite" in first["why"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("claims: []", "non-empty"),
        ("claims:\n  - {id: x, claim: c, lhs: a, op: '!=', rhs: 1}", "`op` must be one of"),
        ("claims:\n  - {id: X-1, claim: c, lhs: a, op: '<', rhs: 1}", "snake_case"),
        ("claims:\n  - {id: x, claim: c, lhs: a, op: '<', rhs: 1, tol: 1}", "unknown fields"),
        (f"claims:\n  - {{{P}, tolerance: -1}}", "no bare constant"),
        (f"claims:\n  - {{{P}, tolerance: 0.05}}", "no bare constant"),
        (f"claims:\n  - {{{P}, tolerance: {{value: 0.1, from: ''}}}}", "no bare constant"),
        ("claims:\n  - {id: x, claim: c, lhs: a, op: '<', rhs: 1}", "`source` must be one of"),
        ("claims:\n  - {id: x, claim: c, source: paper, lhs: a, op: '<', rhs: 1}", "needs `where`"),
        (f"claims:\n  - {{{P}, guards: [x]}}", "only a control claim"),
        (
            "claims:\n  - {id: x, claim: c, source: control, lhs: a, op: '<', rhs: 1, guards: [y]}",
            "guards unknown claim",
        ),
        (f"claims:\n  - {{{P}, revised: {{original: o}}}}", "`revised` must be"),
    ],
)
def test_malformed_claims_name_the_problem(tmp_path, bad, message):
    (tmp_path / "claims.yaml").write_text(bad)
    with pytest.raises(ClaimsError, match=message):
        load_claims(tmp_path / "claims.yaml")


def test_cli_writes_strict_json_results_and_table(tmp_path):
    seeds = {s: _seed(0.1, 0.2, 1.0, float("nan")) for s in "012"}
    claims, metrics = _write(tmp_path, seeds)
    verdicts, results = tmp_path / "v" / "verdicts.json", tmp_path / "results.md"
    main(["evaluate", "--claims", str(claims), "--metrics", str(metrics),
          "--verdicts", str(verdicts), "--results", str(results)])  # fmt: skip
    doc = json.loads(verdicts.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert doc["claims"][2]["verdict"] == INCONCLUSIVE
    text = results.read_text()
    assert "A has lower FVU than B" in text and "**reproduced**" in text and "n/a" in text
    table = claims_table([verdicts])
    assert "The papers' own claims: 3: 2 reproduced, 1 inconclusive." in table


def test_readme_gets_the_table_between_markers_and_keeps_its_prose(tmp_path):
    claims, metrics = _write(tmp_path, {s: _seed(0.1, 0.2, 1.0, 0.9) for s in "012"})
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Paper\nprose\n<!-- results:start -->\nSTALE TABLE\n<!-- results:end -->\nmore\n"
    )
    outs = ["--verdicts", str(tmp_path / "v.json"), "--results", str(tmp_path / "r.md")]
    args = ["evaluate", "--claims", str(claims), "--metrics", str(metrics), *outs]
    for _ in range(2):  # idempotent
        main([*args, "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# Paper\nprose\n<!-- results:start -->\n<!-- Generated")
    assert "STALE TABLE" not in text and text.endswith("<!-- results:end -->\nmore\n")
    assert text.count("A has lower FVU than B") == 1
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="add the lines"):
        main([*args, "--readme", str(readme)])


def test_missing_metrics_file_is_a_clear_error(tmp_path):
    (tmp_path / "claims.yaml").write_text(CLAIMS)
    with pytest.raises(ClaimsError, match="run the paper's notebook stage first"):
        evaluate_claims(tmp_path / "claims.yaml", tmp_path / "nope.json")


CONTROLLED = """
paper: Toy paper
claims:
  - id: a_below_b
    claim: A has lower FVU than B
    source: paper
    where: Fig. 1
    lhs: a.fvu
    op: "<"
    rhs: b.fvu
  - id: b_beats_shuffled
    claim: B's FVU beats the shuffled-pairing control
    source: control
    guards: [a_below_b]
    lhs: b.fvu
    op: "<"
    rhs: b.shuffled
  - id: a_trained
    claim: A trained at all
    source: sanity
    lhs: a.fvu
    op: "<"
    rhs: 1.0
    revised:
      original: "A's FVU below 0.05"
      reason: "0.05 was never reached at this budget; threshold chosen after the first run"
"""


def test_a_failed_control_marks_the_claims_it_guards_unsupported(tmp_path):
    good = {s: {"a": {"fvu": 0.1}, "b": {"fvu": 0.2, "shuffled": 0.9}} for s in "012"}
    by_id = {c["id"]: c for c in evaluate_claims(*_write(tmp_path, good, CONTROLLED))["claims"]}
    assert by_id["a_below_b"]["status"] == REPRODUCED
    bad = {s: {"a": {"fvu": 0.1}, "b": {"fvu": 0.2, "shuffled": 0.1}} for s in "012"}
    verdicts = evaluate_claims(*_write(tmp_path, bad, CONTROLLED))
    by_id = {c["id"]: c for c in verdicts["claims"]}
    assert by_id["a_below_b"]["verdict"] == REPRODUCED  # the comparison itself still holds
    assert by_id["a_below_b"]["status"] == UNSUPPORTED
    assert by_id["a_below_b"]["failed_controls"] == ["b_beats_shuffled"]


def test_headline_counts_only_the_papers_claims(tmp_path):
    seeds = {s: {"a": {"fvu": 0.1}, "b": {"fvu": 0.2, "shuffled": 0.9}} for s in "012"}
    claims, metrics = _write(tmp_path, seeds, CONTROLLED)
    verdicts = tmp_path / "verdicts.json"
    main(["evaluate", "--claims", str(claims), "--metrics", str(metrics),
          "--verdicts", str(verdicts), "--results", str(tmp_path / "r.md")])  # fmt: skip
    table = claims_table([verdicts])
    assert "The papers' own claims: 1: 1 reproduced." in table
    assert "## Our controls and sanity checks (2: 2 reproduced)" in table
    assert "## Revisions made after results were seen" in table and "0.05 was never" in table
    results = (tmp_path / "r.md").read_text()
    assert "#### Our controls and sanity checks" in results and "*revised*" in results


def test_a_verdict_that_moves_with_the_budget_is_not_settled(tmp_path):
    full = {s: _seed(0.1, 0.2, 1.0, 0.9) for s in "012"}
    half = {s: _seed(0.3, 0.2, 1.0, 0.9) for s in "012"}  # A is not yet below B at half budget
    verdicts = evaluate_claims(*_write(tmp_path, full, half=half))
    by_id = {c["id"]: c for c in verdicts["claims"]}
    assert verdicts["settledness_checked"]
    assert by_id["a_below_b"]["verdict"] == REPRODUCED
    assert by_id["a_below_b"]["half"]["verdict"] == NOT_REPRODUCED
    assert by_id["a_below_b"]["status"] == NOT_SETTLED and by_id["a_below_b"]["settled"] is False
    assert (
        by_id["b_dead_above_half"]["status"] == REPRODUCED and by_id["b_dead_above_half"]["settled"]
    )
    unchecked = evaluate_claims(*_write(tmp_path, full))
    assert not unchecked["settledness_checked"] and unchecked["claims"][0]["settled"] is None


def test_seed_spread_tolerance(tmp_path):
    spread = CLAIMS.replace('tolerance: {value: 0.05, from: "Table 2 reports 1.00 +- 0.05"}',
                            "tolerance: seeds")  # fmt: skip
    seeds = {"0": _seed(0.1, 0.2, 1.02, 0.9), "1": _seed(0.1, 0.2, 1.10, 0.9),
             "2": _seed(0.1, 0.2, 1.06, 0.9)}  # fmt: skip
    claim = {c["id"]: c for c in evaluate_claims(*_write(tmp_path, seeds, spread))["claims"]}
    near = claim["a_near_one"]
    assert near["tolerance_used"] == pytest.approx(2 * 0.04)  # 2 x sd of gamma; rhs is a number
    assert near["status"] == INCONCLUSIVE and near["n_holds"] == 2  # 1.10 is outside 1 +- 0.08
