"""The notebook runner passes params.yaml sections to papermill and rejects undeclared names."""

import json

import nbformat
import pytest

from common.notebooks import NotebookParamsError, collect_parameters, main, params_at

PARAMS = {"papers": {"seeds": [0, 1, 2], "topk": {"widths": [8, 16], "steps": 5}}}


def _notebook(path):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("seeds = [0]\nwidths = [1]\nsteps = 1\nout = 'x.json'")
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "import json\n"
        "open(out, 'w').write(json.dumps({'seeds': seeds, 'widths': widths, 'steps': steps}))"
    )
    nb.cells = [params, body]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)


def test_sections_and_literals_become_parameters():
    got = collect_parameters(
        PARAMS, ["papers.seeds", "papers.topk"], ["out=a/b.json", "n=128", "s=[a.1, b.1]"]
    )
    assert got == {
        "seeds": [0, 1, 2],
        "widths": [8, 16],
        "steps": 5,
        "out": "a/b.json",
        "n": 128,
        "s": ["a.1", "b.1"],
    }


def test_missing_section_names_the_key():
    with pytest.raises(NotebookParamsError, match=r"no `topkk` under `papers`"):
        params_at(PARAMS, "papers.topkk")


def test_runs_notebook_with_lists_and_rejects_unknown(tmp_path):
    import yaml

    nb, params_file, out = tmp_path / "nb.ipynb", tmp_path / "params.yaml", tmp_path / "out.json"
    _notebook(nb)
    params_file.write_text(yaml.safe_dump(PARAMS))
    common = [str(nb), str(tmp_path / "run.ipynb"), "--params-file", str(params_file)]
    main([*common, "--params", "papers.seeds", "papers.topk", "--set", f"out={out}"])
    assert json.loads(out.read_text()) == {"seeds": [0, 1, 2], "widths": [8, 16], "steps": 5}
    with pytest.raises(SystemExit, match=r"\['typo'\] are not in its `parameters` cell"):
        main([*common, "--set", "typo=1"])
