"""The paper kit: what every paper notebook needs, so that notebooks keep only the paper's steps.

    from common import kit
    paper = kit.open_paper()          # this folder's parameters, seeds, inputs and outputs
    p = paper.params                  # typed and validated (papers/<folder>/params.py)
    x = paper.lm_activations("train", p.train_tokens)
    sae = paper.train("topk", {"d_sae": 1152, "k": 32}, x, seed=0, steps=p.steps, ...)
    paper.record(seed, {"fvu": ...})  # one seed's metrics, read by the claims checker
    paper.savefig(fig, "frontier.png")
    paper.save_metrics()

A paper folder declares its parameters once in ``params.py`` (``class Params(PaperParams)``); the
pipeline runs its notebooks with ``python -m common.kit run <folder>`` (``dvc.yaml``'s ``paper``
stage), and "Run All" in JupyterLab runs the same experiment: both read ``params.yaml``.
"""

from common.kit.paper import Paper, open_paper
from common.kit.params import PaperParams

__all__ = ["Paper", "PaperParams", "open_paper"]
