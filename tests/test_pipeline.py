"""The whole DVC pipeline on the smoke profile, in a temporary copy of the repository.

Checks the walking skeleton end to end: params.yaml -> toy data -> training -> evaluation ->
papermill notebook -> figure; a second `dvc repro` runs nothing; changing one parameter reruns only
the stages that depend on it; a malformed parameter fails before any work.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return [f for f in out if (ROOT / f).is_file()]


def _run(args, cwd, check=True):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    dst = tmp_path_factory.mktemp("repo")
    for rel in _tracked_files():
        if rel.startswith(("metrics/", "figures/")) or rel == "dvc.lock":
            continue  # regenerate every output from scratch
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)
    _run([str(BIN / "python"), "-m", "common.params", "use", "smoke"], dst)
    _run(["git", "init", "-q"], dst)
    _run(["git", "add", "-A"], dst)
    _run(
        [
            "git",
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@example.com",
            "commit",
            "-qm",
            "copy",
        ],
        dst,
    )
    return dst


def _set_param(repo: Path, dotted: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    node = params
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_smoke_pipeline_end_to_end(repo):
    first = _run(["dvc", "repro"], repo)
    stages = _ran_stages(first.stdout)
    assert {"check_params", "toy_data", "train_toy@relu", "eval_toy@relu", "compare_toy"} <= stages
    metrics = json.loads((repo / "metrics/toy/relu.json").read_text())
    assert metrics["architecture"] == "relu" and 0 <= metrics["dead_fraction"] <= 1
    assert (repo / "figures/00_compare/toy_frontier.png").stat().st_size > 10_000
    executed = json.loads((repo / "outputs/00_compare/toy_compare.ipynb").read_text())
    assert any(c.get("outputs") for c in executed["cells"] if c["cell_type"] == "code")
    shown = _run(["dvc", "metrics", "show", "--json"], repo).stdout
    assert "metrics/toy/relu.json" in shown

    # Nothing changed: nothing runs.
    assert _ran_stages(_run(["dvc", "repro"], repo).stdout) == set()

    # A notebook-only parameter reruns the notebook stage (and the cheap check), nothing upstream.
    _set_param(repo, "compare.title", "changed title")
    assert _ran_stages(_run(["dvc", "repro"], repo).stdout) == {"check_params", "compare_toy"}

    # An SAE hyperparameter reruns that SAE's training, its evaluation and the figure only.
    _set_param(repo, "toy_train.saes.relu.l1_coefficient", 0.05)
    rerun = _ran_stages(_run(["dvc", "repro"], repo).stdout)
    assert rerun == {"check_params", "train_toy@relu", "eval_toy@relu", "compare_toy"}

    # A malformed value fails at the first stage, naming the key; no other stage runs.
    _set_param(repo, "toy_train.steps", -3)
    bad = _run(["dvc", "repro"], repo, check=False)
    assert bad.returncode != 0
    assert "`toy_train.steps` must be a positive integer, got -3" in bad.stdout + bad.stderr
    assert _ran_stages(bad.stdout) == {"check_params"}
    assert (repo / "metrics/toy/relu.json").exists()  # nothing written before is lost


def test_dag_shows_the_chain(repo):
    dag = _run(["dvc", "dag", "--md"], repo).stdout
    for stage in ("check_params", "toy_data", "train_toy@relu", "eval_toy@relu", "compare_toy"):
        assert stage in dag
