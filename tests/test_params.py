"""params.yaml validation: malformed values fail before any work, naming the key."""

import copy
from pathlib import Path

import pytest
import yaml

from common.params import ParamsError, deep_merge, load_params, profile_params, validate_params


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
        (("papers", "folders"), ["99_nope"], "papers/99_nope/claims.yaml does not exist"),
        (("papers", "19_saebench", "architectures"), "topk,nope", "comma-separated string of"),
        (("papers", "07_topk", "widths"), [576], "`papers.07_topk.widths` must be a list of"),
        (("papers", "22_matryoshka", "prefix_fractions"), [0.5, 0.25], "increasing list"),
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
