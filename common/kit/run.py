"""Run a paper folder's notebooks as the pipeline does: ``python -m common.kit run 07_topk``.

For each notebook of ``papers/<folder>/`` (in name order): execute it with papermill in its own
folder (as JupyterLab starts a kernel there, so "Run All" and the pipeline run the same code on the
same ``params.yaml``; no parameter is injected), write the executed copy to
``outputs/<folder>/<name>.ipynb`` and an HTML export with its figures to
``figures/<folder>/<name>.html`` (linked from the paper's README). ``params.yaml`` is validated
first, so a bad value fails before any kernel starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from common import layout
from common.params import ParamsError, load_params, paper_folders, shared_part


def notebooks(folder: str) -> list[Path]:
    """The notebooks of ``papers/<folder>``, in name order."""
    found = sorted((layout.ROOT / "papers" / folder).glob("*.ipynb"))
    if not found:
        raise ParamsError(f"papers/{folder} has no notebook (*.ipynb)")
    return found


def export_html(executed: Path, out: Path) -> Path:
    """The executed notebook as one self-contained HTML file (figures embedded), via nbconvert."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(embed_images=True).from_notebook_node(nbformat.read(executed, 4))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body, encoding="utf-8")
    return out


def run_folder(folder: str, *, html: bool = True) -> list[Path]:
    """Execute every notebook of ``folder``; returns the executed copies."""
    import papermill

    if folder not in paper_folders():
        raise ParamsError(f"unknown paper folder {folder!r}; folders: {paper_folders()}")
    load_params(os.environ.get("SAE_PARAMS_FILE") or layout.ROOT / "params.yaml")
    # The kernel imports `common` from this checkout, whatever is installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(layout.ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    executed = []
    for notebook in notebooks(folder):
        out = layout.ROOT / layout.OUTPUTS / folder / notebook.name
        out.parent.mkdir(parents=True, exist_ok=True)
        papermill.execute_notebook(
            str(notebook), str(out), cwd=str(notebook.parent), progress_bar=False
        )
        if html:
            export_html(out, layout.ROOT / layout.FIGURES / folder / f"{notebook.stem}.html")
        executed.append(out)
    return executed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute a paper folder's notebooks")
    run.add_argument("folder")
    run.add_argument("--no-html", action="store_true", help="skip the HTML export")
    sub.add_parser("folders", help="list the paper folders")
    sweep = sub.add_parser("sweep", help="train one run of the shared LM sweep, every seed")
    sweep.add_argument("run")
    args = parser.parse_args(argv)
    try:
        if args.command == "folders":
            print("\n".join(paper_folders()))
        elif args.command == "sweep":
            from common.kit.sweep import train_run
            from common.settings import SharedParams

            params = load_params(os.environ.get("SAE_PARAMS_FILE") or layout.ROOT / "params.yaml")
            train_run(args.run, SharedParams.model_validate(shared_part(params)))
        else:
            run_folder(args.folder, html=not args.no_html)
    except (ParamsError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
