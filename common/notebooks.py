"""Run a paper's parameterized notebook with papermill, parameters taken from ``params.yaml``.

DVC can only splice scalars into a command line, while paper notebooks take lists (seeds, widths)
and mappings. This runner reads the named sections of ``params.yaml`` and hands them to papermill:

    python -m common.notebooks papers/07_topk/topk.ipynb outputs/07_topk/topk.ipynb \
        --params papers.seeds papers.topk --set figure_dir=figures/07_topk

A mapping section contributes each of its keys as a parameter; any other value is passed under its
last key (``papers.seeds`` -> ``seeds``). ``--set name=value`` adds literal parameters, the value
read as YAML (``128`` an int, ``1e-3`` a float, ``[a, b]`` a list, ``data/x`` a string), for paths
and for values shared with other stages (``site=${lm.site}``). Both are read with
``common.params.load_yaml``, the one loader of params.yaml (YAML 1.2 floats such as ``1e-3``).
Every name must exist in the notebook's ``parameters`` cell, so a typo fails before the kernel
starts, naming the notebook and its valid parameters.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from common.params import load_yaml


class NotebookParamsError(ValueError):
    """A parameter the notebook does not declare, or a params.yaml path that does not exist."""


def params_at(params: dict[str, Any], dotted: str) -> Any:
    """The value at ``a.b.c`` in ``params``, or an error naming the missing key."""
    node: Any = params
    for i, part in enumerate(dotted.split(".")):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(dotted.split(".")[:i]) or "<top level>"
            valid = sorted(node) if isinstance(node, dict) else []
            raise NotebookParamsError(
                f"params.yaml has no `{dotted}` (no `{part}` under `{where}`; valid: {valid})"
            )
        node = node[part]
    return node


def collect_parameters(
    params: dict[str, Any], sections: list[str], literals: list[str]
) -> dict[str, Any]:
    """Notebook parameters from ``params.yaml`` sections and ``name=value`` literals."""
    out: dict[str, Any] = {}
    for dotted in sections:
        value = params_at(params, dotted)
        if isinstance(value, dict):
            out.update(value)
        else:
            out[dotted.split(".")[-1]] = value
    for literal in literals:
        name, sep, value = literal.partition("=")
        if not sep or not name:
            raise NotebookParamsError(f"--set expects name=value, got {literal!r}")
        try:
            out[name] = load_yaml(value) if value else value
        except yaml.YAMLError as err:
            raise NotebookParamsError(f"--set {literal!r}: the value is not valid YAML") from err
    return out


def check_declared(notebook: str | Path, parameters: dict[str, Any]) -> None:
    """Fail if a parameter is not declared in the notebook's ``parameters`` cell."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise NotebookParamsError(
            f"{notebook}: parameter(s) {unknown} are not in its `parameters` cell; "
            f"declared: {sorted(declared)}"
        )


def run_notebook(notebook: str | Path, output: str | Path, parameters: dict[str, Any]) -> None:
    """Execute ``notebook`` into ``output`` with ``parameters`` (papermill, no progress bar)."""
    import papermill

    check_declared(notebook, parameters)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(notebook), str(output), parameters=parameters, progress_bar=False
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("notebook")
    parser.add_argument("output")
    parser.add_argument("--params-file", default="params.yaml")
    parser.add_argument("--params", nargs="*", default=[], help="dotted params.yaml sections")
    parser.add_argument("--set", nargs="*", default=[], dest="literals", help="name=value")
    args = parser.parse_args(argv)
    try:
        params = load_yaml(Path(args.params_file).read_text())
        parameters = collect_parameters(params, args.params, args.literals)
        run_notebook(args.notebook, args.output, parameters)
    except NotebookParamsError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
