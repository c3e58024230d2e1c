"""Claims are checked per seed and summarised into a verdict that can come out any of three ways."""

import json
import math

import pytest

from common.claims import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
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
    paper_value: "0.1 vs 0.2"
    lhs: a.fvu
    op: "<"
    rhs: b.fvu
  - id: a_near_one
    claim: gamma of A is about 1
    lhs: a.gamma
    op: "~="
    rhs: 1.0
    tolerance: 0.05
  - id: b_dead_above_half
    claim: B has many dead latents
    lhs: b.dead
    op: ">"
    rhs: 0.5
"""


def _write(tmp_path, seeds, claims=CLAIMS):
    (tmp_path / "claims.yaml").write_text(claims)
    (tmp_path / "metrics.json").write_text(json.dumps({"seeds": seeds}))
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
        ("claims:\n  - {id: x, claim: c, lhs: a, op: '<', rhs: 1, tolerance: -1}", ">= 0"),
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
    assert "3 claims: 2 reproduced, 0 not reproduced, 1 inconclusive" in table


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
