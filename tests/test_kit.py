"""The paper kit: a folder's parameters from params.yaml, the shared training settings, the shared
LM sweep with its half-budget snapshots, and the metrics file the claims checker reads."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from common import kit
from common.activations.store import ActivationStoreWriter
from common.kit import sweep
from common.kit.params import sweep_runs_of
from common.params import ParamsError, profile_params, shared_part
from common.settings import SharedParams


@pytest.fixture
def smoke_params(tmp_path, monkeypatch):
    params = profile_params("smoke")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    monkeypatch.setenv("SAE_PARAMS_FILE", str(path))
    return params


def test_open_paper_reads_params_yaml_and_overrides_are_checked(smoke_params):
    paper = kit.open_paper("07_topk")
    assert paper.params.eval_tokens == smoke_params["papers"]["topk"]["eval_tokens"]
    assert paper.seeds == smoke_params["papers"]["seeds"]
    assert kit.open_paper("07_topk", overrides={"eval_tokens": 3}).params.eval_tokens == 3
    with pytest.raises(ParamsError, match="`papers.topk.eval_tokens` must be a positive integ"):
        kit.open_paper("07_topk", overrides={"eval_tokens": -1})
    with pytest.raises(ParamsError, match="not inside a paper folder"):
        kit.open_paper()  # the tests do not run inside papers/NN_name


def test_the_sweep_runs_a_paper_reads_are_checked_at_open_time(smoke_params):
    paper = kit.open_paper("45_absorption")
    assert sweep_runs_of(paper.params) == {
        "width_runs": smoke_params["papers"]["absorption"]["width_runs"],
        "k_runs": smoke_params["papers"]["absorption"]["k_runs"],
    }
    assert sweep_runs_of(kit.open_paper("07_topk").params)["plain_run"] == ["topk_k8_w2304_plain"]
    with pytest.raises(ParamsError, match=r"`papers.absorption.k_runs` .*\['topk_k99'\] is not"):
        kit.open_paper("45_absorption", overrides={"k_runs": ["topk_k32", "topk_k99"]})
    hyper = paper.sweep_hyperparameters("topk_k8_w2304_plain")
    assert hyper["architecture"] == "topk" and hyper["aux_coefficient"] == 0.0
    assert paper.sweep_hyperparameters("msae")["architecture"] == "msae"  # the run's name


def test_shared_training_settings_come_from_papers_training(smoke_params):
    paper = kit.open_paper("07_topk")
    cfg = paper.train_config(
        "topk", {"d_sae": 8, "k": 2}, steps=200, batch_size=64, lr=1e-3, seed=0
    )
    t = paper.training
    assert cfg.lr_warmup_steps == round(t.lr_warmup_fraction * 200)
    assert cfg.lr_decay_fraction == t.lr_decay_fraction and cfg.grad_clip == t.grad_clip
    assert cfg.dead_after_tokens == round(t.dead_window_fraction * 200 * 64)
    override = paper.train_config("topk", {}, steps=200, batch_size=64, lr=1e-3, seed=0,
                                  dead_after_tokens=640)  # fmt: skip
    assert override.dead_after_tokens == 640


def test_record_and_save_metrics_with_a_half_budget(smoke_params, tmp_path, monkeypatch):
    paper = kit.open_paper("07_topk")
    monkeypatch.setattr(paper, "root", tmp_path)
    for seed in paper.seeds:
        paper.record(seed, {"derived": {"x": torch.tensor(1.5)}})
        paper.record(seed, {"derived": {"x": 1.0}}, budget="half")
    doc = json.loads(paper.save_metrics({"note": "t"}).read_text())
    assert doc["seeds"]["0"]["derived"]["x"] == 1.5
    assert doc["budgets"]["half"]["seeds"]["0"]["derived"]["x"] == 1.0
    assert doc["config"]["eval_tokens"] == paper.params.eval_tokens
    assert doc["config"]["note"] == "t"
    with pytest.raises(ValueError, match="not one of papers.seeds"):
        paper.record(99, {})


def test_sweep_trains_every_seed_with_a_half_budget_snapshot(smoke_params, tmp_path, monkeypatch):
    store = tmp_path / "data/lm/train/resid_post.1"
    with ActivationStoreWriter(store, d=16, shard_tokens=512, metadata={"site": "t"}) as writer:
        writer.append(torch.randn(2048, 16) + 3.0)
    shared = SharedParams.model_validate(shared_part(smoke_params))
    folders = sweep.train_run("topk_k32", shared, root=tmp_path)
    assert [f.name for f in folders] == [f"s{s}" for s in shared.papers.seeds]
    paper = kit.open_paper("07_topk")
    monkeypatch.setattr(paper, "root", tmp_path)
    full, half = paper.sweep_sae("topk_k32", 0), paper.sweep_sae("topk_k32", 0, budget="half")
    assert full.cfg.d_sae == half.cfg.d_sae == 64
    assert not torch.equal(full.W_dec, half.W_dec)
    assert not (folders[0] / "checkpoint").exists()  # only the SAEs are kept
    with pytest.raises(ValueError, match="lm_sweep.saes does not have"):
        paper.sweep_sae("nope", 0)
    with pytest.raises(FileNotFoundError, match="dvc repro sweep_lm@relu_l1_3"):
        paper.sweep_sae("relu_l1_3", 0)
    assert Path(folders[0] / "live").is_dir()
