"""Paper notebooks: committed without outputs, and "Run All" runs the same experiment as dvc repro.

The pipeline executes a folder's notebooks with ``python -m common.kit run <folder>``, in the
folder, injecting no parameter; a notebook opened in JupyterLab runs in its folder too. Both read
their values from params.yaml through ``kit.open_paper()``. So they run the same experiment as
long as (1) the notebook's ``parameters`` cell holds nothing but ``overrides = {}``, (2) no code
cell assigns one of the folder's declared parameters (which would shadow params.yaml), and (3) the
runner injects nothing. Each is checked here; a notebook that breaks one fails.
"""

import ast
from pathlib import Path

import nbformat
import pytest

from common.kit import run
from common.params import paper_folders, paper_params_class

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "papers").rglob("*.ipynb"))
PAPER_NOTEBOOKS = [nb for f in paper_folders() for nb in run.notebooks(f)]
OVERRIDES_ONLY = "overrides: dict = {}"


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found under papers/"
    assert len(PAPER_NOTEBOOKS) >= len(paper_folders())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=str)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.outputs or c.execution_count)
    ]
    assert not dirty, (
        f"{path}: cells {dirty} have outputs; strip them (jupyter nbconvert --clear-output)"
    )


def _code_cells(path: Path) -> list[nbformat.NotebookNode]:
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", PAPER_NOTEBOOKS, ids=str)
def test_parameters_cell_holds_only_overrides(path):
    tagged = [c for c in _code_cells(path) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path}: needs exactly one cell tagged `parameters`"
    code = [line.split("#")[0].strip() for line in tagged[0].source.splitlines() if line.strip()]
    assert code == [OVERRIDES_ONLY], (
        f"{path}: the parameters cell must be `{OVERRIDES_ONLY}` only; declare parameters in "
        f"papers/{path.parent.name}/params.py, so that params.yaml holds their values"
    )


def _assigned_names(source: str) -> set[str]:
    """Names bound at the top level of a cell (assignments, for targets, with, imports)."""
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    tree = ast.parse("\n".join(lines))
    names = set()
    for node in tree.body:
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        elif isinstance(node, (ast.For, ast.With)):
            targets = [node.target] if isinstance(node, ast.For) else []
        for target in targets:
            names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


@pytest.mark.parametrize("path", PAPER_NOTEBOOKS, ids=str)
def test_no_cell_shadows_a_declared_parameter(path):
    declared = set(paper_params_class(path.parent.name).model_fields)
    shadowed = {
        i: sorted(_assigned_names(c.source) & declared) for i, c in enumerate(_code_cells(path))
    }
    shadowed = {i: names for i, names in shadowed.items() if names}
    assert not shadowed, (
        f"{path}: code cells {shadowed} assign declared parameters; read them from "
        "`paper.params` instead, so that the notebook runs what params.yaml says"
    )


@pytest.mark.parametrize("path", PAPER_NOTEBOOKS, ids=str)
def test_notebook_opens_its_paper_through_the_kit(path):
    source = "\n".join(c.source for c in _code_cells(path))
    assert "kit.open_paper(overrides=overrides)" in source, (
        f"{path}: open the folder with `paper = kit.open_paper(overrides=overrides)`"
    )
    assert "sys.path" not in source and "os.chdir" not in source, (
        f"{path}: no sys.path edits or chdir: the kernel runs in the folder (common.kit.run)"
    )


def test_the_runner_injects_no_parameter(monkeypatch, tmp_path):
    import papermill

    calls = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(run.layout, "ROOT", tmp_path)  # outputs go to a scratch folder
    monkeypatch.setenv("SAE_PARAMS_FILE", str(ROOT / "params.yaml"))
    folder = paper_folders()[0]
    monkeypatch.setattr(run, "notebooks", lambda f: [ROOT / "papers" / f / "x.ipynb"])
    run.run_folder(folder, html=False)
    ((args, kwargs),) = calls
    assert "parameters" not in kwargs and len(args) == 2
    assert kwargs["cwd"] == str(ROOT / "papers" / folder)


def test_paper_stage_is_the_kit_runner():
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["paper"]["do"]["cmd"] == "python -m common.kit run ${key}"
    assert stages["paper"]["foreach"] == "${papers.inputs}"
