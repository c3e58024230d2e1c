"""``open_paper()``: a paper folder's parameters, inputs, training settings and outputs.

A notebook in ``papers/<folder>/`` starts with ``paper = kit.open_paper()``: the folder is the
notebook's own (the kernel's working directory, as JupyterLab and ``python -m common.kit run``
start it), its parameters are ``papers.<name>`` of ``params.yaml`` (the folder name without its
number) validated against ``papers/<folder>/params.py``, and every path is resolved
against the repository root, wherever the notebook was opened from. What the notebook
writes goes where the pipeline expects it: ``metrics/papers/<folder>/metrics.json`` (read by the
claims checker) and ``figures/<folder>/``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common import layout
from common.kit.params import check_sweep_runs
from common.params import (
    PAPER_FOLDER,
    ParamsError,
    load_yaml,
    paper_folders,
    paper_params_class,
    paper_section,
    shared_part,
    validate_section,
)
from common.settings import SharedParams, Training

PARAMS_FILE_ENV = "SAE_PARAMS_FILE"  # another params file (tests); default: <root>/params.yaml
BUDGETS = ("full", "half")  # the full training budget, and half of it (the settledness check)


def folder_of(path: Path) -> str:
    """The paper folder ``path`` is in (``papers/07_topk/...`` -> ``07_topk``)."""
    for part in (path, *path.parents):
        if part.parent.name == "papers" and PAPER_FOLDER.match(part.name):
            return part.name
    raise ParamsError(
        f"{path} is not inside a paper folder (papers/NN_name); pass the folder: "
        f"open_paper('07_topk'). Folders: {paper_folders()}"
    )


def _jsonable(value: Any) -> Any:
    """``value`` with tensors, numpy scalars and tuples made JSON-able; NaN/inf kept as floats."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return _jsonable(value.tolist())
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class Paper:
    """One paper folder, opened by a notebook (see ``open_paper``)."""

    folder: str
    params: Any  # the folder's ``Params`` instance (a pydantic model; attribute access)
    shared: SharedParams
    raw: dict[str, Any]
    root: Path = layout.ROOT
    started: float = field(default_factory=time.perf_counter)
    _metrics: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    # --- what every paper reads -----------------------------------------------------------------
    @property
    def seeds(self) -> list[int]:
        """The evaluation seeds (``papers.seeds``): every claim is checked in each."""
        return list(self.shared.papers.seeds)

    @property
    def training(self) -> Training:
        """The training settings every paper's SAEs share (``papers.training``)."""
        return self.shared.papers.training

    @property
    def lm(self) -> Any:
        """The language-model section (``lm``): model, sites, corpus, context length, ..."""
        return self.shared.lm

    def path(self, relative: str | Path) -> Path:
        """A path under the repository root."""
        return self.root / relative

    # --- inputs ---------------------------------------------------------------------------------
    def lm_store(self, split: str, site: str | None = None) -> Path:
        """The activation store of ``site`` (default ``lm.site``) for ``split`` (train / eval)."""
        return self.path(layout.lm_store(split, site or self.lm.site))

    def lm_activations(self, split: str, max_tokens: int, site: str | None = None) -> Tensor:
        """The first ``max_tokens`` rows of an LM activation store, fp32 (N, d)."""
        from common.activations.files import load_activations

        return load_activations(self.lm_store(split, site), max_tokens=max_tokens)

    @property
    def model_cache(self) -> Path:
        """Where the converted default LM lives (``load_model(name, cache_dir=...)``)."""
        return self.path(layout.LM_MODELS)

    def model_spec(self, spec: str) -> str:
        """A model named in params: a pipeline folder is resolved under the root, else as given."""
        return str(self.path(spec)) if spec.split("/")[0] in ("data", "runs") else spec

    @property
    def clip(self) -> str:
        """The vision papers' CLIP (``papers.clip``): a path under the root, or a hub id."""
        return self.model_spec(self.shared.papers.clip)

    @property
    def image_features(self) -> Path:
        """The CLIP-style stage's pooled image-tower feature cache."""
        return self.path(layout.IMAGE_FEATURES)

    # --- training -------------------------------------------------------------------------------
    def train_config(
        self,
        architecture: str,
        sae: dict[str, Any],
        *,
        steps: int,
        batch_size: int,
        lr: float,
        seed: int,
        **overrides: Any,
    ) -> Any:
        """A ``TrainConfig`` with the shared settings of ``papers.training``: warm-up over the
        first ``lr_warmup_fraction`` of the steps (at least one), linear decay over the last
        ``lr_decay_fraction``, clipping at ``grad_clip``, normalised activations, and a latent
        counted dead after ``dead_window_fraction`` of the run's tokens (``common.kit.sweep.
        shared_train_settings``). ``overrides`` (any ``TrainConfig`` field) win; a paper says
        why where it overrides one."""
        from common.kit.sweep import shared_train_settings
        from common.train import TrainConfig

        settings = shared_train_settings(
            self.training, steps=steps, batch_size=batch_size, log_every=steps, **overrides
        )
        return TrainConfig(
            architecture=architecture,
            sae=dict(sae),
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            **settings,
        )

    def train(
        self,
        architecture: str,
        sae: dict[str, Any],
        x: Tensor,
        *,
        seed: int,
        steps: int,
        batch_size: int,
        lr: float,
        **overrides: Any,
    ) -> Any:
        """Train one SAE on the rows of ``x`` with the shared settings (``train_config``) and
        return it; its checkpoints live in a temporary folder, removed afterwards."""
        from common.train import TensorBatches, train

        cfg = self.train_config(
            architecture, sae, steps=steps, batch_size=batch_size, lr=lr, seed=seed, **overrides
        )
        with tempfile.TemporaryDirectory(prefix=f"{self.folder}_") as tmp:
            return train(cfg, TensorBatches(x, cfg.batch_size, seed), tmp, progress=False)

    def train_budgets(
        self,
        architecture: str,
        sae: dict[str, Any],
        x: Tensor,
        *,
        seed: int,
        steps: int,
        batch_size: int,
        lr: float,
        **overrides: Any,
    ) -> dict[str, Any]:
        """``{"full": SAE, "half": SAE}``: one run of ``train`` and the same run's SAE after half
        its steps (a snapshot, no second training), for the settledness check: record the
        metrics of each with ``record(seed, ..., budget=...)``."""
        from common.sae import SAE
        from common.train import TensorBatches, snapshot_dir, train

        cfg = self.train_config(
            architecture, sae, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
            snapshot_fractions=(0.5,), **overrides,
        )  # fmt: skip
        with tempfile.TemporaryDirectory(prefix=f"{self.folder}_") as tmp:
            full = train(cfg, TensorBatches(x, cfg.batch_size, seed), tmp, progress=False)
            half = SAE.load(snapshot_dir(tmp, 0.5)).to(next(full.parameters()).device)
        return {"full": full, "half": half.eval()}

    def sweep_sae(self, run: str, seed: int, budget: str = "full") -> Any:
        """SAE ``run`` of the shared LM sweep (``lm_sweep.saes``) for ``seed``, after the full
        training budget or half of it (``budget="half"``, a snapshot of the same run)."""
        from common.kit.sweep import HALF, run_dir
        from common.sae import SAE
        from common.train import FINAL_DIR, snapshot_dir

        if run not in self.shared.lm_sweep.saes:
            raise ValueError(
                f"papers.{paper_section(self.folder)} reads sweep run {run!r}, which "
                f"lm_sweep.saes does not have (runs: {sorted(self.shared.lm_sweep.saes)}); "
                "add it there"
            )
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
        folder = run_dir(run, seed, self.root)
        path = folder / FINAL_DIR if budget == "full" else snapshot_dir(folder, HALF)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: train the sweep first (`dvc repro sweep_lm@{run}`)"
            )
        return SAE.load(path).eval()

    def sweep_hyperparameters(self, run: str) -> dict[str, Any]:
        """Run ``run`` of the shared LM sweep as declared in ``lm_sweep.saes``, with its
        ``architecture`` (which defaults to the run name) always present."""
        if run not in self.shared.lm_sweep.saes:
            raise ValueError(
                f"lm_sweep.saes has no run {run!r}: {sorted(self.shared.lm_sweep.saes)}"
            )
        hyper = dict(self.shared.lm_sweep.saes[run])
        return {"architecture": hyper.pop("architecture", run), **hyper}

    @property
    def budgets(self) -> tuple[str, ...]:
        """The training budgets every claim is checked at: the full one and half of it."""
        return BUDGETS

    # --- outputs --------------------------------------------------------------------------------
    @property
    def figure_dir(self) -> Path:
        return self.path(f"{layout.FIGURES}/{self.folder}")

    @property
    def metrics_path(self) -> Path:
        return self.path(f"{layout.METRICS}/{self.folder}/metrics.json")

    def savefig(self, fig: Any, name: str) -> Path:
        """Save ``fig`` as ``figures/<folder>/<name>`` in the repository's one style."""
        from common.plots import savefig

        path = self.figure_dir / name
        savefig(fig, path)
        return path

    def record(self, seed: int, metrics: Mapping[str, Any], budget: str = "full") -> None:
        """Add one seed's metrics (a nested mapping; claims read dotted paths into it).
        ``budget="half"``: the same metrics from the half-budget SAEs (settledness)."""
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
        if seed not in self.seeds:
            raise ValueError(f"seed {seed} is not one of papers.seeds {self.seeds}")
        self._metrics.setdefault(budget, {}).setdefault(str(seed), {}).update(_jsonable(metrics))

    def save_metrics(self, config: Mapping[str, Any] | None = None) -> Path:
        """Write ``metrics/papers/<folder>/metrics.json``: ``seeds`` (the full budget), ``budgets``
        (e.g. ``half``), and ``config`` (this paper's parameters, the seeds, ``config``, the
        notebook's wall time). Every seed must have been recorded."""
        full = self._metrics.get("full", {})
        missing = [s for s in self.seeds if str(s) not in full]
        if missing:
            raise ValueError(f"no metrics recorded for seed(s) {missing}: call paper.record(...)")
        result = {
            "seeds": full,
            "budgets": {b: {"seeds": m} for b, m in self._metrics.items() if b != "full"},
            "config": {
                **self.params.model_dump(mode="json"),
                "seeds": self.seeds,
                **_jsonable(dict(config or {})),
                "wall_seconds": time.perf_counter() - self.started,
            },
        }
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self.metrics_path.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
        print(
            f"wrote {self.metrics_path.relative_to(self.root)} in "
            f"{result['config']['wall_seconds']:.0f} s"
        )
        return self.metrics_path


def params_file() -> Path:
    """The params file notebooks read: ``$SAE_PARAMS_FILE`` or ``<root>/params.yaml``."""
    return Path(os.environ.get(PARAMS_FILE_ENV) or layout.ROOT / "params.yaml")


def open_paper(folder: str | None = None, overrides: Mapping[str, Any] | None = None) -> Paper:
    """The paper folder a notebook belongs to, with its parameters from ``params.yaml``.

    ``folder``: default, the folder of the working directory (a notebook's own folder).
    ``overrides``: values for this run only, on top of params.yaml (checked like the file).
    """
    folder = folder or folder_of(Path.cwd().resolve())
    path = params_file()
    try:
        raw = load_yaml(path.read_text())
    except FileNotFoundError:
        raise ParamsError(
            f"{path} does not exist; write it with `python -m common.params use default`"
        ) from None
    papers = raw.get("papers", {}) if isinstance(raw, dict) else {}
    key = paper_section(folder)
    if key not in papers:
        raise ParamsError(
            f"{path} has no `papers.{key}`; regenerate it with `python -m common.params use "
            "default` (or the profile you use)"
        )
    section = {**papers[key], **dict(overrides or {})}
    params = validate_section(paper_params_class(folder), section, f"papers.{key}")
    shared = validate_section(SharedParams, shared_part(raw), "")
    check_sweep_runs(folder, params, shared.lm_sweep.saes)  # the sweep runs it reads exist
    torch.manual_seed(0)
    return Paper(folder=folder, params=params, shared=shared, raw=raw)


__all__ = ["BUDGETS", "Paper", "folder_of", "open_paper", "params_file"]
