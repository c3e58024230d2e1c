"""The one trainer: determinism, resume, divergence, bad input, the command line."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from common.activations.files import check_activations, load_activation_file
from common.sae import SAE, LossOutput, available_architectures, build_sae, register
from common.sae.registry import get_architecture
from common.sae.relu import ReluConfig, ReluSAE
from common.toy import superposition
from common.train import (
    CheckpointError,
    TensorBatches,
    TrainConfig,
    TrainingDiverged,
    load_checkpoint,
    lr_factor,
    main,
    make_optimizer,
    train,
    train_step,
)


@pytest.fixture(scope="module")
def toy():
    return superposition(n_samples=4000, n_features=32, d=16, p_active=0.05, seed=3)


def _cfg(**kw):
    base = dict(
        architecture="relu",
        sae={"d_sae": 64, "l1_coefficient": 1e-2},
        steps=40,
        batch_size=128,
        lr=3e-3,
        checkpoint_every=10,
        log_every=10,
    )
    return TrainConfig(**{**base, **kw})


def _state(sae):
    return {k: v.clone() for k, v in sae.state_dict().items()}


def test_same_seed_same_weights_and_different_seed_differs(toy, tmp_path):
    a = train(_cfg(), TensorBatches(toy.x, 128, seed=0), tmp_path / "a", progress=False)
    b = train(_cfg(), TensorBatches(toy.x, 128, seed=0), tmp_path / "b", progress=False)
    c = train(_cfg(seed=1), TensorBatches(toy.x, 128, seed=1), tmp_path / "c", progress=False)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.W_dec, c.W_dec)


RESUMABLE = {
    "relu": {},
    # TopK: sparse code, W_enc stored transposed, AuxK on after two batches without firing
    "topk": {"architecture": "topk", "sae": {"d_sae": 64, "k": 4}, "dead_after_tokens": 256},
}


@pytest.mark.parametrize("arch", list(RESUMABLE))
def test_resume_after_interruption_gives_the_same_final_weights(toy, tmp_path, arch):
    cfg = _cfg(**RESUMABLE[arch])
    full = train(cfg, TensorBatches(toy.x, 128), tmp_path / "full", progress=False)
    train(cfg, TensorBatches(toy.x, 128), tmp_path / "cut", progress=False, stop_after=17)
    ckpt = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert ckpt["step"] == 17 and not (tmp_path / "cut" / "sae").exists()
    resumed = train(cfg, TensorBatches(toy.x, 128), tmp_path / "cut", progress=False)
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert (tmp_path / "cut" / "sae" / "sae.safetensors").exists()


@pytest.mark.parametrize("arch", list(RESUMABLE))
def test_restored_adam_moments_have_their_parameters_strides(toy, tmp_path, arch):
    """Fused Adam treats parameter and moments as flat memory: a contiguous moment beside the
    transposed W_enc would be silently mis-updated, so a resume must restore the strides."""
    cfg = _cfg(**RESUMABLE[arch])
    train(cfg, TensorBatches(toy.x, 128), tmp_path, progress=False, stop_after=3)
    sae = build_sae(cfg.architecture, d_in=toy.x.shape[1], **cfg.sae)
    opt = make_optimizer(sae, cfg)
    load_checkpoint(tmp_path, sae, opt)
    assert not sae.W_enc.is_contiguous()  # the case that matters is present
    for name, param in sae.named_parameters():
        state = opt.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].stride() == param.stride(), (name, key)
            assert state[key].device == param.device


def _small_sae(arch: str, d_in: int) -> SAE:
    fields = {f.name for f in dataclasses.fields(get_architecture(arch).config_class)}
    hyper = {"k": 4} if "k" in fields else {}
    hyper |= {"ks": [4, 8]} if "ks" in fields else {}
    return build_sae(arch, d_in=d_in, d_sae=64, **hyper)


@pytest.mark.parametrize(
    "arch", [a for a in available_architectures() if not a.startswith("test_")]
)
def test_fused_adam_steps_match_plain_adam(arch):
    """The trainer's fused Adam reads parameter, gradient and moments as flat memory; any stride
    mismatch (W_enc is stored transposed) would make it disagree with per-element Adam."""
    torch.manual_seed(0)
    x = torch.randn(2048, 16)
    sae = _small_sae(arch, 16)
    sae.init_from_data(x)
    twin, initial = copy.deepcopy(sae), copy.deepcopy(sae)
    cfg = TrainConfig(architecture=arch, lr=1e-2)
    fused = make_optimizer(sae, cfg)
    assert fused.defaults["fused"]
    plain = torch.optim.Adam(twin.parameters(), lr=cfg.lr, betas=cfg.adam_betas, foreach=False)
    tokens = [torch.zeros(64, dtype=torch.long) for _ in range(2)]
    for step in range(3):
        batch = x[step * 64 : (step + 1) * 64]
        train_step(sae, fused, batch, step, cfg, tokens[0])
        train_step(twin, plain, batch, step, cfg, tokens[1])
    moved = False
    for (name, a), b, a0 in zip(
        sae.named_parameters(), twin.parameters(), initial.parameters(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name
        moved |= not torch.allclose(a, a0, atol=1e-4)
    assert moved


def test_firing_counts_from_the_sparse_code_match_the_dense_code(toy):
    """``train_step`` reads firing from the sparse TopK code; the dense code must agree."""
    cfg = _cfg(architecture="topk", sae={"d_sae": 64, "k": 4}, dead_after_tokens=256)
    counters = []
    for sparse in (True, False):
        torch.manual_seed(0)
        sae = build_sae("topk", d_in=toy.x.shape[1], **cfg.sae)
        sae.init_from_data(toy.x[:512])
        if not sparse:  # the dense code, through the same step
            sae.loss_with_sparse_code = sae.loss  # type: ignore[method-assign]
        opt, tokens = make_optimizer(sae, cfg), torch.zeros(64, dtype=torch.long)
        for step in range(6):
            out = train_step(sae, opt, toy.x[step * 128 : (step + 1) * 128], step, cfg, tokens)
            assert out.z.is_sparse == sparse
        counters.append(tokens)
    assert torch.equal(*counters)
    assert (counters[0] > 0).any() and (counters[0] == 0).any()


def test_incompatible_checkpoint_on_resume_is_a_clear_error(toy, tmp_path):
    train(_cfg(), TensorBatches(toy.x, 128), tmp_path / "run", progress=False, stop_after=10)
    other = _cfg(sae={"d_sae": 32, "l1_coefficient": 1e-2})
    with pytest.raises(
        CheckpointError, match=r"(?s)cannot resume .*sae.d_sae: 64 in the checkpoint, 32 in this"
    ):
        train(other, TensorBatches(toy.x, 128), tmp_path / "run", progress=False)


@register
class _ExplodingSAE(ReluSAE):
    """A ReLU SAE whose loss becomes NaN at step 25, to test divergence handling."""

    name = "test_exploding"
    config_class = ReluConfig

    def loss_with_sparse_code(self, x, ctx=None) -> LossOutput:  # what the trainer calls
        out = super().loss_with_sparse_code(x, ctx)
        if ctx is not None and ctx.step >= 25:
            out.loss = out.loss * float("nan")
        return out


def test_nan_loss_stops_with_last_good_checkpoint_intact(toy, tmp_path):
    cfg = _cfg(architecture="test_exploding")
    with pytest.raises(TrainingDiverged, match="step 25.*last good checkpoint"):
        train(cfg, TensorBatches(toy.x, 128), tmp_path, progress=False)
    ckpt = SAE.load(tmp_path / "checkpoint")
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 20
    assert all(torch.isfinite(p).all() for p in ckpt.parameters())


def test_training_reduces_fvu_and_logs_with_dvclive(toy, tmp_path):
    sae = train(
        _cfg(steps=200),
        TensorBatches(toy.x, 128),
        tmp_path,
        live_dir=tmp_path / "live",
        progress=False,
    )
    with torch.no_grad():
        fvu = ((toy.x - sae(toy.x)).pow(2).sum() / (toy.x - toy.x.mean(0)).pow(2).sum()).item()
    assert fvu < 0.2
    logged = (
        (tmp_path / "live" / "plots" / "metrics" / "train" / "fvu.tsv").read_text().splitlines()
    )
    assert len(logged) > 5


def test_lr_schedule_warmup_and_decay():
    cfg = TrainConfig(architecture="relu", steps=100, lr_warmup_steps=10, lr_decay_fraction=0.2)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(50, cfg) == 1.0
    assert lr_factor(90, cfg) == pytest.approx(0.5)


def test_tensor_batches_cover_each_vector_once_per_epoch():
    x = torch.arange(12.0).unsqueeze(1)
    batches = TensorBatches(x, batch_size=4, seed=0)
    epoch = torch.cat([batches.batch(s) for s in range(3)]).flatten()
    assert sorted(epoch.tolist()) == list(range(12))
    assert torch.equal(batches.batch(5), TensorBatches(x, 4, seed=0).batch(5))


@pytest.mark.parametrize("steps", [0, -1])
def test_bad_train_config(steps):
    with pytest.raises(ValueError, match="`steps` must be a positive integer"):
        TrainConfig(architecture="relu", steps=steps)


def test_unknown_architecture_lists_valid_ones(toy, tmp_path):
    with pytest.raises(
        ValueError, match="Unknown SAE architecture 'nope'. Valid architectures: .*relu"
    ):
        train(
            TrainConfig(architecture="nope", steps=1),
            TensorBatches(toy.x, 16),
            tmp_path,
            progress=False,
        )


def test_unknown_hyperparameter(toy, tmp_path):
    cfg = TrainConfig(architecture="relu", sae={"d_sae": 8, "l1": 1.0}, steps=1)
    with pytest.raises(
        ValueError, match=r"Unknown hyperparameter\(s\) \['l1'\] for architecture 'relu'"
    ):
        train(cfg, TensorBatches(toy.x, 16), tmp_path, progress=False)


@pytest.mark.parametrize(
    ("x", "error", "message"),
    [
        (torch.zeros(10), ValueError, "expected a 2-D"),
        (torch.zeros(10, 4, dtype=torch.int64), TypeError, "floating dtype"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, "NaN/Inf values in 1 rows"),
        (torch.tensor([[1.0, 2.0], [float("inf"), 1.0]]), ValueError, "first bad row 1"),
    ],
)
def test_bad_activations(x, error, message):
    with pytest.raises(error, match=message):
        check_activations(x)


def test_activation_files_npy_and_safetensors(tmp_path):
    x = torch.randn(20, 3)
    np.save(tmp_path / "a.npy", x.numpy())
    save_file({"acts": x, "other": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    assert torch.equal(load_activation_file(tmp_path / "a.npy"), x)
    assert torch.equal(load_activation_file(tmp_path / "a.safetensors", key="acts"), x)
    with pytest.raises(KeyError, match="no tensor 'activations'.*acts"):
        load_activation_file(tmp_path / "a.safetensors")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):  # never unpickle
        load_activation_file(tmp_path / "obj.npy")


def test_command_line_trains_from_a_plain_file(toy, tmp_path, capsys):
    np.save(tmp_path / "acts.npy", toy.x.numpy())
    main(
        [
            "--data",
            str(tmp_path / "acts.npy"),
            "--arch",
            "relu",
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "20",
            "--batch-size",
            "64",
            "--d_sae",
            "32",
            "--l1_coefficient",
            "0.01",
            "--quiet",
        ]
    )
    sae = SAE.load(tmp_path / "run" / "sae")
    assert sae.cfg.d_sae == 32 and sae.cfg.l1_coefficient == 0.01 and sae.cfg.d_in == toy.x.shape[1]
    with pytest.raises(SystemExit, match="Unknown hyperparameter"):
        main(
            [
                "--data",
                str(tmp_path / "acts.npy"),
                "--arch",
                "relu",
                "--out",
                str(tmp_path / "r2"),
                "--steps",
                "2",
                "--d_sae",
                "8",
                "--bogus",
                "1",
                "--quiet",
            ]
        )


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No SAE checkpoint .*missing config.json"):
        SAE.load(tmp_path)


def test_normalized_training_is_scale_free_and_evaluates_in_raw_units(toy, tmp_path):
    from common.evals import evaluate

    cfg = _cfg(steps=60, normalize_activations=True)
    small = train(cfg, TensorBatches(toy.x, 128), tmp_path / "a", progress=False)
    big = train(cfg, TensorBatches(toy.x * 1000, 128), tmp_path / "b", progress=False)
    expected = toy.x.shape[1] ** 0.5 / toy.x.norm(dim=1).mean().item()
    assert small.cfg.input_scale == pytest.approx(expected, rel=0.05)
    assert big.cfg.input_scale == pytest.approx(small.cfg.input_scale / 1000, rel=1e-4)
    for key, value in small.state_dict().items():  # the same SAE in normalised units
        torch.testing.assert_close(value, big.state_dict()[key], rtol=1e-3, atol=1e-4)
    m_small, m_big = evaluate(small, toy.x), evaluate(big, toy.x * 1000)
    assert m_big["fvu"] == pytest.approx(m_small["fvu"], rel=1e-3)
    assert m_big["mse"] == pytest.approx(m_small["mse"] * 1e6, rel=1e-3)  # raw units
    assert SAE.load(tmp_path / "b" / "sae").cfg.input_scale == big.cfg.input_scale


def test_half_budget_snapshot_is_the_run_at_half_its_steps(tmp_path):
    """``snapshot_fractions=(0.5,)`` saves the same run's SAE after half its steps: the weights an
    interrupted run holds at that step (same schedule), without a second training."""
    x = torch.randn(2048, 16)
    cfg = TrainConfig(
        architecture="topk", sae={"d_sae": 32, "k": 4}, steps=20, batch_size=128,
        lr_warmup_steps=2, lr_decay_fraction=0.2, snapshot_fractions=(0.5,), seed=1,
    )  # fmt: skip
    full = train(cfg, TensorBatches(x, 128, 1), tmp_path / "run", progress=False)
    half = SAE.load(tmp_path / "run" / "snapshots" / "0.5")
    stopped = tmp_path / "stopped"
    train(cfg, TensorBatches(x, 128, 1), stopped, stop_after=10, progress=False)
    at_ten = SAE.load(stopped / "checkpoint")
    for name, tensor in half.state_dict().items():
        assert torch.equal(tensor, at_ten.state_dict()[name]), name
    assert not torch.equal(half.W_dec, full.W_dec)  # training went on after the snapshot
    with pytest.raises(ValueError, match="snapshot_fractions"):
        TrainConfig(architecture="topk", snapshot_fractions=(1.0,))
