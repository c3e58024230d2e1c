"""The base of every paper's parameter declaration (``papers/<folder>/params.py``).

    from common.kit.params import PaperParams, PositiveInt

    class Params(PaperParams):
        inputs = "lm"          # the shared inputs the folder reads: toy | lm | vision | diffusion
        steps: PositiveInt = 150
        \"\"\"SAE training steps\"\"\"

The field's type and constraints are checked before any work (``common.params``), its default is
the default profile's value, its docstring documents it; profiles override values only.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field

from common.params import (
    CommaInts,
    Device,
    Fraction,
    ImageDatasets,
    Increasing,
    Invalid,
    NonNegFloat,
    NonNegInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Section,
    Text,
    _distinct,
    _split,
    expects,
    fail,
    paper_section,
)
from common.settings import (
    ClipModel,
    DiffusionModelName,
    EfficientNetSites,
    HookSite,
    ScorerName,
    UNetSite,
    UNetSites,
)

InputKind = Literal["toy", "lm", "vision", "diffusion"]
Distinct = AfterValidator(_distinct)


def _architecture_list(value: str) -> str:
    from common.sae import available_architectures

    names = [n.strip() for n in value.split(",")]
    unknown = [n for n in names if n not in available_architectures()]
    if not names or unknown:
        raise Invalid(ARCHITECTURES_TEXT, f": unknown {unknown}" if unknown else "")
    return value


ARCHITECTURES_TEXT = (
    "a comma-separated string of registry names (common.sae.available_architectures())"
)
ArchitectureList = Annotated[str, AfterValidator(_architecture_list), expects(ARCHITECTURES_TEXT)]


def _prefix_fractions(value: list[float]) -> list[float]:
    ok = value and all(0 < f <= 1 for f in value) and value[-1] == 1
    if not ok or any(a >= b for a, b in zip(value, value[1:], strict=False)):
        raise Invalid(PREFIX_TEXT)
    return value


PREFIX_TEXT = "an increasing list of numbers in (0, 1] ending at 1.0"
PrefixFractions = Annotated[list[float], AfterValidator(_prefix_fractions), expects(PREFIX_TEXT)]


class _SweepRunMarker:
    """Marks a field that names runs of the shared LM sweep (``lm_sweep.saes``)."""


SWEEP_RUN = _SweepRunMarker()
SWEEP_TEXT = "run names of the shared LM sweep (lm_sweep.saes)"
SweepRun = Annotated[str, Field(min_length=1), SWEEP_RUN, expects(f"one of the {SWEEP_TEXT}")]
"""One run of the shared LM sweep that the paper reads (checked against ``lm_sweep.saes``)."""
SweepRuns = Annotated[
    list[str], Field(min_length=1), Distinct, SWEEP_RUN, expects(f"a list of distinct {SWEEP_TEXT}")
]
"""Runs of the shared LM sweep that the paper reads (checked against ``lm_sweep.saes``)."""


def sweep_runs_of(params: Section) -> dict[str, list[str]]:
    """``{field: runs}`` for every field of ``params`` declared ``SweepRun`` / ``SweepRuns``."""
    out = {}
    for name, info in type(params).model_fields.items():
        _, metadata = _split(info.annotation)
        if any(m is SWEEP_RUN for m in [*metadata, *info.metadata]):
            value = getattr(params, name)
            out[name] = [value] if isinstance(value, str) else list(value)
    return out


def check_sweep_runs(folder: str, params: Section, saes: dict[str, object]) -> None:
    """Raise ``ParamsError`` naming the field and the runs when ``papers.<name>`` reads sweep
    runs that ``lm_sweep.saes`` does not have."""
    for name, runs in sweep_runs_of(params).items():
        missing = [r for r in runs if r not in saes]
        if missing:
            value = getattr(params, name)
            raise fail(
                f"papers.{paper_section(folder)}.{name}",
                value,
                f"{SWEEP_TEXT}: {sorted(saes)}",
                f": {missing} {'is' if len(missing) == 1 else 'are'} not in the sweep (add a run "
                "to `_sweep_saes` in common/settings.py, or name an existing one)",
            )


class PaperParams(Section):
    """A paper folder's own section of params.yaml, ``papers.<name>``
    (the folder name without its number)."""

    inputs: ClassVar[InputKind] = "lm"


__all__ = [
    "ArchitectureList",
    "Distinct",
    "Field",
    "PrefixFractions",
    "ClipModel",
    "CommaInts",
    "Device",
    "DiffusionModelName",
    "EfficientNetSites",
    "Fraction",
    "HookSite",
    "ImageDatasets",
    "Increasing",
    "InputKind",
    "Invalid",
    "NonNegFloat",
    "NonNegInt",
    "PaperParams",
    "PositiveFloat",
    "PositiveInt",
    "Probability",
    "ScorerName",
    "SweepRun",
    "SweepRuns",
    "Text",
    "UNetSite",
    "UNetSites",
    "check_sweep_runs",
    "expects",
    "sweep_runs_of",
]
