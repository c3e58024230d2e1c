"""``params.yaml``: typed declarations, validation before any work, and profiles.

Every parameter is declared once, with its type and default, as a field of a pydantic model:
the shared sections (``seed``, ``toy``, ``lm``, ``papers.training``, ...) in ``common.settings``,
each paper's own section in ``papers/<folder>/params.py`` (a ``common.kit.PaperParams``). The
default profile *is* those defaults; ``profiles/<name>.yaml`` only overrides values. ``params.yaml``
is generated from them (``use``) and is what ``dvc repro``, ``dvc exp run -S key=value`` and a
notebook opened in JupyterLab all read.

A bad value fails at once with the dotted key, the value found and the value expected; the
expected value is derived from the declaration itself (``describe``), so the message and the
check cannot drift apart. ``check_params`` is the first stage of the pipeline and every other stage
depends on its output (``data/params_valid.json``), so nothing runs on a malformed file.

What is checked where: ``validate_params`` checks the file (types, ranges, names of models, hook
sites and devices) and is what tests and ``use`` run, on any machine. Whether a device exists here
(``cuda`` needs a GPU) is a property of the machine that does the work, so only the ``check``
command verifies it (``common.device.resolve_device``), unless given ``--no-hardware``.

Every reader parses params.yaml with ``load_yaml``: PyYAML's safe loader plus YAML 1.2's exponent
floats, so ``lr: 1e-3`` is the number 0.001 (as DVC, which reads YAML 1.2, sees it) and not the
string '1e-3'. Numbers must be finite: ``.inf`` and ``.nan`` are rejected everywhere.

    python -m common.params check         # validate params.yaml, and its devices on this machine
    python -m common.params check --no-hardware   # validate it for another machine (no devices)
    python -m common.params use smoke     # params.yaml <- the declared defaults + smoke.yaml
    python -m common.params use default   # back to the declared defaults
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import annotated_types as at
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "profiles"
PAPERS = ROOT / "papers"
PAPER_FOLDER = re.compile(r"^\d\d_[a-z0-9_]+$")


class ParamsError(ValueError):
    """A value in params.yaml is malformed; the message names the key and what is expected."""


# --- reading YAML as a person writes it --------------------------------------------------------
class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads YAML 1.2's exponent floats (``1e-3``, ``5E-4``).

    YAML 1.1 (PyYAML) needs a dot and a signed exponent, so ``1e-3`` loads as the string '1e-3'.
    The resolver is added after PyYAML's own ones: whatever loaded before loads to the same value.
    """


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse ``params.yaml``-style YAML: ``yaml.safe_load`` plus YAML 1.2 floats such as 1e-3."""
    return yaml.load(text, Loader=_ParamsLoader)


# --- declarations: sections and reusable value types -------------------------------------------
class Section(BaseModel):
    """One section of params.yaml. Fields are the keys, with their type, constraints and default
    (the default profile); a field's docstring documents it in place. Strict: ``1e4`` is not an
    integer, ``"3"`` is not a number, ``true`` is not ``1``; unknown keys are errors."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        frozen=True,
        use_attribute_docstrings=True,
    )


class Invalid(ValueError):
    """Raised by a custom validator: what was expected, and why the value is not it.

    ``subkey`` (e.g. ``relu.l1_coefficient``) and ``value`` point below the field itself."""

    def __init__(self, expected: str, why: str = "", *, subkey: str = "", value: Any = ...) -> None:
        super().__init__(f"{expected}{why}")
        self.expected, self.why, self.subkey, self.value = expected, why, subkey, value


def expects(description: str) -> Any:
    """Annotated metadata that replaces the derived description of a type (see ``describe``)."""
    return _Expect(description)


class _Expect:
    def __init__(self, text: str) -> None:
        self.text = text


PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(gt=0, le=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Text = Annotated[str, Field(min_length=1)]


def _distinct(values: list[Any]) -> list[Any]:
    if len(set(map(str, values))) != len(values):
        raise Invalid("a list of distinct values", ": a value repeats")
    return values


def _increasing(values: list[Any]) -> list[Any]:
    if any(a >= b for a, b in zip(values, values[1:], strict=False)):
        raise Invalid("a strictly increasing list", f": {values} is not increasing")
    return values


Seeds = Annotated[
    list[NonNegInt],
    Field(min_length=3),
    AfterValidator(_distinct),
    expects("a list of at least 3 distinct integers >= 0 (claims are checked over seeds)"),
]
Increasing = AfterValidator(_increasing)


def _device(value: str) -> str:
    if re.fullmatch(r"cpu|cuda(?::[0-9]+)?|mps", value) is None:
        raise Invalid(DEVICE_TEXT)
    return value


DEVICE_TEXT = "a torch device: 'cpu', 'cuda', 'cuda:N' (N = 0, 1, ...) or 'mps'"
Device = Annotated[str, AfterValidator(_device), expects(DEVICE_TEXT)]


def _comma_ints(value: str) -> str:
    if not all(p.strip().isdigit() and int(p) > 0 for p in value.split(",")):
        raise Invalid(COMMA_INTS_TEXT)
    return value


COMMA_INTS_TEXT = 'a comma-separated string of positive integers, e.g. "1,5"'
CommaInts = Annotated[str, AfterValidator(_comma_ints), expects(COMMA_INTS_TEXT)]

ImageDataset = Literal["fashion-mnist", "digits"]
ImageDatasets = Annotated[
    list[ImageDataset],
    Field(min_length=1),
    expects("a non-empty list drawn from ['fashion-mnist', 'digits']"),
]


# --- what a declaration expects, in words ------------------------------------------------------
def _bounds(metadata: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in metadata:
        if isinstance(m, FieldInfo):
            out.update(_bounds(m.metadata))
        for name in ("gt", "ge", "lt", "le", "min_length", "max_length"):
            if isinstance(m, getattr(at, _BOUND_TYPES[name])):
                out[name] = getattr(m, name)
    return out


_BOUND_TYPES = {
    "gt": "Gt",
    "ge": "Ge",
    "lt": "Lt",
    "le": "Le",
    "min_length": "MinLen",
    "max_length": "MaxLen",
}


def _split(tp: Any) -> tuple[Any, list[Any]]:
    """``Annotated[T, m1, m2]`` -> ``(T, [m1, m2])`` (nested Annotated flattened)."""
    metadata: list[Any] = []
    while typing.get_origin(tp) is Annotated:
        tp, *extra = typing.get_args(tp)
        metadata = [*extra, *metadata]
    return tp, metadata


def describe(tp: Any, metadata: list[Any] | None = None) -> str:
    """The value a declaration expects, in words: ``Annotated[int, Field(gt=0)]`` is "a positive
    integer", ``list[...]`` with ``min_length=2`` is "a list of at least 2 values, each ...",
    ``Literal['a', 'b']`` is "one of ['a', 'b']". ``expects(text)`` metadata overrides it."""
    tp, inner = _split(tp)
    metadata = [*(metadata or []), *inner]
    for m in metadata:
        if isinstance(m, _Expect):
            return m.text
    b = _bounds(metadata)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        text = " or ".join(describe(a) for a in options)
        return f"null or {text}" if len(options) < len(args) else text
    if origin is Literal:
        return f"one of {list(args)}"
    if origin is list:
        n = b.get("min_length", 0)
        head = f"a list of at least {n} values" if n else "a list"
        return f"{head}, each {describe(args[0])}" if args else head
    if origin is dict:
        return "a mapping"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a non-empty string" if b.get("min_length") else "a string"
    if tp in (int, float):
        noun = "integer" if tp is int else "number"
        article = "an" if tp is int else "a"
        if b.get("gt") == 0 and len(b) == 1:
            return f"a positive {noun}"
        lo = (">=", b["ge"]) if "ge" in b else (">", b["gt"]) if "gt" in b else None
        hi = ("<=", b["le"]) if "le" in b else ("<", b["lt"]) if "lt" in b else None
        if lo and hi:
            left = "[" if lo[0] == ">=" else "("
            right = "]" if hi[0] == "<=" else ")"
            return f"{article} {noun} in {left}{lo[1]}, {hi[1]}{right}"
        if lo or hi:
            op, bound = lo or hi  # type: ignore[misc]
            return f"{article} {noun} {op} {bound}"
        return f"{article} {noun}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


# --- errors that name the key, the value and the expectation -----------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _as_number(text: str) -> int | float | None:
    """The finite number a numeric-looking string means ('1e-3' -> 0.001, '1e4' -> 10000)."""
    try:
        number = float(text.strip().replace("_", ""))
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    return int(number) if number.is_integer() else number


_EXPECTS_NUMBER = re.compile(r"\b(?:number|integer|digit|cosine)s?\b")


def hint(value: Any, expected: str) -> str:
    """The fix for what a person plausibly wrote: a quoted number, inf / nan, 1e4 for an integer."""
    items = value if isinstance(value, list) else [value]
    if any(isinstance(x, float) and not math.isfinite(x) for x in items):
        return "; inf and nan are not accepted: write a finite number"
    if not _EXPECTS_NUMBER.search(expected) or "string" in expected:
        return ""
    for x in items:
        number = _as_number(x) if isinstance(x, str) else None
        if number is not None:
            return f"; {x!r} is a string: write it as a number, without quotes, e.g. {number!r}"
        if isinstance(x, float) and x.is_integer() and "integer" in expected:
            return f"; write {x!r} as an integer, e.g. {int(x)}"
    return ""


def fail(key: str, value: Any, expected: str, why: str = "") -> ParamsError:
    """The error for ``key``: the value found, the value expected, and why or how to fix it."""
    return ParamsError(f"params.yaml: `{key}` must be {expected}, got {value!r}{why}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_keys(model: type[BaseModel], value: Any, key: str) -> None:
    """Unknown and missing keys, recursively through sub-sections, before any value is checked."""
    if not isinstance(value, dict):
        raise ParamsError(f"params.yaml: `{key or '<top level>'}` must be a mapping, got {value!r}")
    fields = model.model_fields
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ParamsError(
            f"params.yaml: unknown key(s) {[_join(key, u) for u in unknown]}; valid keys"
            f"{' under `' + key + '`' if key else ''}: {sorted(fields)}"
        )
    missing = sorted(set(fields) - set(value))
    if missing:
        raise ParamsError(
            f"params.yaml: missing key(s) {[_join(key, m) for m in missing]}; restore them with "
            "`python -m common.params use default` (or the profile you use)"
        )
    for name, info in fields.items():
        tp, _ = _split(info.annotation)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            _check_keys(tp, value[name], _join(key, name))


def _translate(err: ValidationError, model: type[BaseModel], value: dict, key: str) -> ParamsError:
    """The first pydantic error as a ``ParamsError`` naming the dotted key (field order)."""
    first = err.errors()[0]
    loc = [part for part in first["loc"] if isinstance(part, str)]
    node_model: Any = model
    node_value: Any = value
    path = key
    info: FieldInfo | None = None
    for part in loc:
        if not (isinstance(node_model, type) and issubclass(node_model, BaseModel)):
            break
        if part not in node_model.model_fields:
            break
        info = node_model.model_fields[part]
        node_value = node_value[part] if isinstance(node_value, dict) else node_value
        path = _join(path, part)
        node_model, _ = _split(info.annotation)
    if info is None:  # a model-level check (a model_validator)
        ctx_error = first.get("ctx", {}).get("error")
        message = str(ctx_error) if ctx_error is not None else first["msg"]
        return ParamsError(f"params.yaml: `{key}`: {message}")
    ctx_error = first.get("ctx", {}).get("error")
    if isinstance(ctx_error, Invalid):
        where = _join(path, ctx_error.subkey) if ctx_error.subkey else path
        found = node_value if ctx_error.value is ... else ctx_error.value
        declared = _declared_expectation(info)
        if declared is None or ctx_error.subkey or declared == ctx_error.expected:
            expected, why = ctx_error.expected, ctx_error.why
        else:  # the declaration says what is expected; the validator says what is wrong
            expected, why = declared, ctx_error.why or f": it is not {ctx_error.expected}"
        return fail(where, found, expected, why or hint(found, expected))
    expected = describe(info.annotation, list(info.metadata))
    return fail(path, node_value, expected, hint(node_value, expected))


def _declared_expectation(info: FieldInfo) -> str | None:
    """The ``expects(...)`` text of a field's type, if it declares one."""
    _, metadata = _split(info.annotation)
    texts = [m.text for m in [*metadata, *info.metadata] if isinstance(m, _Expect)]
    return texts[0] if texts else None


def validate_section(model: type[Section], value: Any, key: str) -> Section:
    """``value`` (a params.yaml mapping at ``key``) as an instance of ``model``, or a
    ``ParamsError`` naming the first bad key."""
    _check_keys(model, value, key)
    try:
        return model.model_validate(value)
    except ValidationError as err:
        raise _translate(err, model, value, key) from None


# --- the paper folders and their declarations --------------------------------------------------
def paper_folders() -> list[str]:
    """Every ``papers/NN_name`` folder that declares its parameters (``params.py``), in order."""
    return sorted(
        p.parent.name for p in PAPERS.glob("*/params.py") if PAPER_FOLDER.match(p.parent.name)
    )


def paper_section(folder: str) -> str:
    """The key of a folder's own section of params.yaml: ``papers.<name>``, the folder name
    without its number (``46_monosemanticity`` -> ``monosemanticity``). DVC parses ``dvc exp run
    -S`` with Hydra's override grammar, where a key may not start with a digit."""
    return folder.split("_", 1)[1]


def paper_sections() -> dict[str, str]:
    """Section key -> folder, for every paper folder; a ``ParamsError`` when two folders share a
    name or a name is taken by a shared ``papers`` setting."""
    from common.settings import Papers

    sections: dict[str, str] = {}
    for folder in paper_folders():
        key = paper_section(folder)
        if key in sections or key in Papers.model_fields:
            taken = f"papers/{sections[key]}" if key in sections else f"the shared `papers.{key}`"
            raise ParamsError(
                f"papers/{folder}: its params section `papers.{key}` is already {taken}; "
                "rename the folder (the part after the number must be unique)"
            )
        sections[key] = folder
    return sections


@cache
def paper_params_class(folder: str) -> type[Section]:
    """The ``Params`` class declared in ``papers/<folder>/params.py``."""
    path = PAPERS / folder / "params.py"
    if not path.is_file():
        raise ParamsError(
            f"papers/{folder}/params.py does not exist; paper folders with parameters: "
            f"{paper_folders()}"
        )
    spec = importlib.util.spec_from_file_location(f"papers_{folder}_params", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    cls = getattr(module, "Params", None)
    if not (isinstance(cls, type) and issubclass(cls, Section)):
        raise ParamsError(f"papers/{folder}/params.py must define `class Params(PaperParams)`")
    return cls


# --- the whole file ----------------------------------------------------------------------------
def _shared() -> type[Section]:
    from common.settings import SharedParams

    return SharedParams


def declared_defaults() -> dict[str, Any]:
    """The default profile: every declared default, shared sections and paper folders."""
    params = _shared()().model_dump(mode="json")
    for folder in paper_folders():
        section = paper_params_class(folder)().model_dump(mode="json")
        params["papers"][paper_section(folder)] = section
    params["papers"]["inputs"] = paper_inputs()
    return params


def paper_inputs() -> dict[str, dict[str, str]]:
    """Per paper folder, the shared inputs its stage depends on (``common.settings.INPUT_STAGE``
    of the kind its ``Params.inputs`` declares): ``papers.inputs`` of params.yaml."""
    from common.settings import INPUT_STAGE

    return {
        f: {**INPUT_STAGE[paper_params_class(f).inputs], "section": paper_section(f)}
        for f in paper_folders()
    }


def _papers_part(params: dict[str, Any]) -> dict[str, Any]:
    return params.get("papers") if isinstance(params.get("papers"), dict) else {}


def shared_part(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` without the paper folders' own sections: what ``SharedParams`` validates."""
    sections = paper_sections()
    papers = {k: v for k, v in _papers_part(params).items() if k not in sections}
    return {**params, "papers": papers}


def validate_params(params: dict[str, Any]) -> dict[str, Any]:
    """Raise ``ParamsError`` naming the first bad key; return ``params`` unchanged otherwise.

    Checks the file only (no hardware): see ``check_hardware`` for the devices.
    """
    if not isinstance(params, dict):
        raise ParamsError(f"params.yaml must be a mapping of sections, got {params!r}")
    sections = paper_sections()
    papers = _papers_part(params)
    shared = validate_section(_shared(), shared_part(params), "")
    for key, folder in sections.items():
        if key not in papers:
            raise ParamsError(
                f"params.yaml: missing key(s) ['papers.{key}'] (declared in "
                f"papers/{folder}/params.py); regenerate with `python -m common.params use default`"
            )
        validate_section(paper_params_class(folder), papers[key], f"papers.{key}")
    want = paper_inputs()
    if shared.papers.inputs != want:  # type: ignore[attr-defined]
        raise fail(
            "papers.inputs",
            shared.papers.inputs,  # type: ignore[attr-defined]
            f"the inputs the paper folders declare, {want}",
            "; regenerate params.yaml with `python -m common.params use default`",
        )
    from common.settings import cross_checks

    cross_checks(params)
    return params


def _device_paths(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, info in model.model_fields.items():
        tp, metadata = _split(info.annotation)
        key = _join(prefix, name)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            yield from _device_paths(tp, key)
        elif any(
            isinstance(m, _Expect) and m.text == DEVICE_TEXT for m in [*metadata, *info.metadata]
        ):
            yield key


def check_hardware(params: dict[str, Any]) -> None:
    """Every device named in (valid) ``params`` exists on this machine, or a ``ParamsError``."""
    from common.device import resolve_device

    keys = list(_device_paths(_shared()))
    for folder in paper_folders():
        prefix = f"papers.{paper_section(folder)}"
        keys += list(_device_paths(paper_params_class(folder), prefix))
    for key in keys:
        value: Any = params
        for part in key.split("."):
            value = value[part]
        try:
            resolve_device(value, key=key)
        except ValueError as err:
            raise ParamsError(
                f"params.yaml: {err}. To validate the file for another machine: "
                "`python -m common.params check --no-hardware`"
            ) from err


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read ``path`` with ``load_yaml`` and validate it (``validate_params``)."""
    path = Path(path)
    try:
        params = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from err
    return validate_params(params)


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` wins; nested mappings merge key by key; a ``null`` in the overlay deletes."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def profiles() -> list[str]:
    """``default`` (the declarations) and every overlay in ``profiles/``."""
    return ["default", *sorted(p.stem for p in PROFILES.glob("*.yaml"))]


def profile_params(name: str) -> dict[str, Any]:
    """The declared defaults, with ``profiles/<name>.yaml`` merged on top (none for default)."""
    defaults = declared_defaults()
    if name == "default":
        return defaults
    overlay_path = PROFILES / f"{name}.yaml"
    if not overlay_path.exists():
        raise ParamsError(f"unknown profile {name!r}; valid profiles: {profiles()}")
    return deep_merge(defaults, load_yaml(overlay_path.read_text()) or {})


HEADER = (
    "# Generated by `python -m common.params use {profile}`: the declared defaults\n"
    "# (common/settings.py, papers/*/params.py) with profiles/{profile}.yaml on top.\n"
    "# Edit freely (or `dvc exp run -S key=value`); restore with\n"
    "# `python -m common.params use {profile}`.\n"
)


def render(params: dict[str, Any], profile: str) -> str:
    """params.yaml's text for ``params`` (the output of ``use``)."""
    body = yaml.safe_dump(params, sort_keys=False, width=100)
    return HEADER.format(profile=profile).replace("profiles/default.yaml", "no overlay") + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate params.yaml and its devices on this machine")
    check.add_argument("--params", default="params.yaml")
    check.add_argument("--out", help="write a small JSON stamp here when valid")
    check.add_argument(
        "--no-hardware",
        action="store_true",
        help="do not check that the devices exist here (validating for another machine)",
    )
    use = sub.add_parser("use", help="write params.yaml from a profile")
    use.add_argument("profile")
    use.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            params = load_params(args.params)
            if not args.no_hardware:
                check_hardware(params)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                # Independent of the values: downstream stages rerun only on their own params.
                Path(args.out).write_text(json.dumps({"params_valid": True}) + "\n")
            print(f"{args.params}: valid")
        else:
            params = validate_params(profile_params(args.profile))
            Path(args.params).write_text(render(params, args.profile))
            print(f"{args.params} <- profile {args.profile!r}")
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


Check = Callable[[Any], bool]
__all__ = [
    "ClassVar",
    "Device",
    "Fraction",
    "ImageDatasets",
    "Invalid",
    "NonNegFloat",
    "NonNegInt",
    "ParamsError",
    "PositiveFloat",
    "PositiveInt",
    "Probability",
    "Section",
    "Seeds",
    "Text",
    "describe",
    "load_params",
    "load_yaml",
    "validate_params",
]

if __name__ == "__main__":  # run the imported module's main, so its classes are the ones papers use
    from common.params import main as _main

    sys.exit(_main())
