"""The shared LM sweep: every SAE the LM papers read, trained once (``sweep_lm`` stage).

``python -m common.kit sweep <run>`` trains run ``lm_sweep.saes.<run>`` on the LM's training
activations at ``lm.site`` (streamed from the activation store), once per seed of
``papers.seeds``, with the shared training settings (``papers.training``: warm-up, decay,
clipping, normalisation, the dead-latent window) and a half-budget snapshot:

    data/lm/sweep/<run>/s<seed>/sae/              the SAE after lm_sweep.steps steps
    data/lm/sweep/<run>/s<seed>/snapshots/0.5/    the same run after half of them
    data/lm/sweep/<run>/s<seed>/live/             its training curves (dvclive)

A seed interrupted mid-run resumes from its checkpoint (``common.train``); a finished seed's
checkpoint (weights plus Adam state) is removed, so the DVC cache holds only the SAEs. Papers load
them with ``paper.sweep_sae(run, seed, budget)``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from common import layout
from common.settings import SharedParams, Training

SWEEP = "data/lm/sweep"
HALF = 0.5


def run_dir(run: str, seed: int, root: Path = layout.ROOT) -> Path:
    """Where sweep run ``run`` of ``seed`` lives."""
    return root / SWEEP / run / f"s{seed}"


def shared_train_settings(
    training: Training, *, steps: int, batch_size: int, **overrides: Any
) -> dict[str, Any]:
    """The ``TrainConfig`` fields every paper's SAEs share (``papers.training``) for a run of
    ``steps`` x ``batch_size`` tokens; ``overrides`` win."""
    settings: dict[str, Any] = {
        "lr_warmup_steps": max(1, round(training.lr_warmup_fraction * steps)),
        "lr_decay_fraction": training.lr_decay_fraction,
        "grad_clip": training.grad_clip,
        "normalize_activations": training.normalize_activations,
        "dead_after_tokens": max(
            batch_size, round(training.dead_window_fraction * steps * batch_size)
        ),
        "checkpoint_every": steps,
        "log_every": max(1, steps // 20),
    }
    settings.update(overrides)
    return settings


def train_run(run: str, shared: SharedParams, *, root: Path = layout.ROOT) -> list[Path]:
    """Train sweep run ``run`` for every evaluation seed; returns the runs' folders."""
    from common.activations.store import ActivationStore
    from common.train import CHECKPOINT_DIR, TrainConfig, train

    sweep = shared.lm_sweep
    if run not in sweep.saes:
        raise ValueError(f"unknown sweep run {run!r}; lm_sweep.saes has {sorted(sweep.saes)}")
    hyper = dict(sweep.saes[run])
    architecture = hyper.pop("architecture", run)
    store = ActivationStore(root / layout.lm_store("train", shared.lm.site))
    folders = []
    for seed in shared.papers.seeds:
        cfg = TrainConfig(
            architecture=architecture,
            sae=hyper,
            steps=sweep.steps,
            batch_size=sweep.batch_size,
            lr=sweep.lr,
            seed=seed,
            device=sweep.device,
            snapshot_fractions=(HALF,),
            **shared_train_settings(
                shared.papers.training, steps=sweep.steps, batch_size=sweep.batch_size
            ),
        )
        out = run_dir(run, seed, root)
        print(f"sweep {run} seed {seed} -> {out.relative_to(root)}", flush=True)
        train(cfg, store.batches(cfg.batch_size, seed=seed), out, live_dir=out / "live")
        shutil.rmtree(out / CHECKPOINT_DIR)  # done: the SAEs stay, the Adam state need not
        folders.append(out)
    return folders
