"""Notebooks are committed without outputs and each has a cell tagged `parameters`."""

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "papers").rglob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found under papers/"


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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=str)
def test_has_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), (
        f"{path}: no cell tagged `parameters`, so papermill cannot inject params.yaml values"
    )
