"""The trainer under faults: changed settings on resume, non-finite gradients and weights, a kill
while saving a checkpoint, damaged checkpoints, bad settings, and dvclive rows across a resume."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import common.train as train_module
from common.sae import SAE
from common.sae.relu import ReluSAE
from common.toy import superposition
from common.train import TensorBatches, TrainConfig, TrainingDiverged, main, train

BATCH = 128


@pytest.fixture(scope="module")
def toy_x() -> torch.Tensor:
    return superposition(n_samples=2000, n_features=32, d=16, p_active=0.05, seed=3).x


def _cfg(**kw) -> TrainConfig:
    base = dict(
        architecture="relu",
        sae={"d_sae": 64, "l1_coefficient": 1e-2},
        steps=40,
        batch_size=BATCH,
        lr=3e-3,
        checkpoint_every=10,
        log_every=10,
    )
    return TrainConfig(**{**base, **kw})


def _run(cfg: TrainConfig, x: torch.Tensor, out: Path, **kw) -> SAE:
    return train(cfg, TensorBatches(x, cfg.batch_size, seed=cfg.seed), out, progress=False, **kw)


def _ckpt_step(out: Path) -> int:
    return json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]


def _same_weights(a: SAE, b: SAE) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


# --- 1. resume only with the same settings and data ----------------------------------------------
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"lr": 0.05}, "lr: 0.003 in the checkpoint, 0.05 in this run"),
        ({"batch_size": 64}, "batch_size: 128 in the checkpoint, 64 in this run"),
        ({"steps": 60}, "steps: 40 in the checkpoint, 60 in this run"),
        ({"data": "other"}, "data.sha256: "),
    ],
)
def test_resume_with_changed_settings_or_data_is_refused(toy_x, tmp_path, change, expected):
    _run(_cfg(), toy_x, tmp_path)
    final = (tmp_path / "sae" / "sae.safetensors").read_bytes()
    x = toy_x * 2 if change.pop("data", None) else toy_x
    with pytest.raises(ValueError, match=r"(?s)cannot resume.*" + expected + r".*--no-resume"):
        _run(_cfg(**change), x, tmp_path)
    assert (tmp_path / "sae" / "sae.safetensors").read_bytes() == final  # old weights not resaved


def test_command_line_rerun_with_another_lr_stops_and_says_how_to_start_over(toy_x, tmp_path):
    np.save(tmp_path / "acts.npy", toy_x.numpy())
    args = ["--data", str(tmp_path / "acts.npy"), "--arch", "relu", "--out", str(tmp_path / "r")]
    args += ["--steps", "6", "--batch-size", "64", "--d_sae", "16", "--quiet"]
    main(args)
    with pytest.raises(SystemExit, match=r"(?s)lr: 0.001 in the checkpoint, 0.05 in this run.*"):
        main([*args, "--lr", "0.05"])
    assert "lr: 0.001" in (tmp_path / "r" / "live" / "params.yaml").read_text()  # untouched


@pytest.mark.parametrize("kind", ["npy", "store"])
def test_command_line_rerun_on_other_data_is_refused(toy_x, tmp_path, kind):
    """Same settings, another --data (same shape, the rows in another order): stop and say so;
    the old weights stay; --no-resume, the fix the message names, trains on the new data."""
    from common.activations.store import ActivationStoreWriter

    def data(name: str, x: torch.Tensor) -> Path:
        if kind == "npy":
            np.save(tmp_path / f"{name}.npy", x.numpy())
            return tmp_path / f"{name}.npy"
        with ActivationStoreWriter(tmp_path / name, d=16, shard_tokens=512, metadata={}) as w:
            w.append(x)
        return tmp_path / name

    a, b = data("a", toy_x), data("b", toy_x.flip(0))
    args = ["--arch", "relu", "--out", str(tmp_path / "r"), "--steps", "6", "--batch-size", "64"]
    args += ["--d_sae", "16", "--quiet"]
    weights = tmp_path / "r" / "sae" / "sae.safetensors"
    main(["--data", str(a), *args])
    first = weights.read_bytes()
    with pytest.raises(SystemExit, match=r"(?s)cannot resume.*\n  data\..*--no-resume"):
        main(["--data", str(b), *args])
    assert weights.read_bytes() == first
    main(["--data", str(b), *args, "--no-resume"])
    assert weights.read_bytes() != first


def test_settings_that_do_not_change_the_weights_may_change_on_resume(toy_x, tmp_path):
    full = _run(_cfg(), toy_x, tmp_path / "full")
    _run(_cfg(), toy_x, tmp_path / "cut", stop_after=13)
    resumed = _run(_cfg(log_every=3, checkpoint_every=7), toy_x, tmp_path / "cut")
    assert _same_weights(full, resumed)


def test_checkpoint_from_before_the_settings_check_resumes_with_a_warning(toy_x, tmp_path):
    full = _run(_cfg(), toy_x, tmp_path / "full")
    _run(_cfg(), toy_x, tmp_path / "cut", stop_after=13)
    state_file = tmp_path / "cut" / "checkpoint" / "trainer_state.json"
    state_file.write_text(json.dumps({"step": 13}))  # what the trainer used to write
    with pytest.warns(UserWarning, match="predates the settings check"):
        resumed = _run(_cfg(), toy_x, tmp_path / "cut")
    assert _same_weights(full, resumed)


def test_store_batches_are_identified_by_their_shards_and_batching(tmp_path):
    from common.activations.store import ActivationStore, ActivationStoreWriter

    def store(name: str, scale: float) -> ActivationStore:
        x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0)) * scale
        with ActivationStoreWriter(tmp_path / name, d=8, shard_tokens=128, metadata={}) as w:
            w.append(x)
        return ActivationStore(tmp_path / name)

    a, b = store("a", 1.0), store("b", 2.0)
    fp = train_module.data_fingerprint
    assert fp(a.batches(32)) == fp(ActivationStore(tmp_path / "a").batches(32))
    assert fp(a.batches(32)) != fp(b.batches(32))  # other data
    assert fp(a.batches(32)) != fp(a.batches(64))  # other batches
    assert fp(a.batches(32)) != fp(a.batches(32, seed=1))


# --- 2. non-finite gradients and weights never reach a checkpoint ---------------------------------
class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return torch.full_like(grad, float("nan"))


def _nan_gradient_at(monkeypatch: pytest.MonkeyPatch, bad_step: int) -> None:
    original = ReluSAE.loss_with_sparse_code  # the loss the trainer calls

    def loss(self, x, ctx=None):  # noqa: ANN001, ANN202
        out = original(self, x, ctx)
        if ctx is not None and ctx.step == bad_step:
            out.loss = _NanGradient.apply(out.loss)
        return out

    monkeypatch.setattr(ReluSAE, "loss_with_sparse_code", loss)


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_nan_gradient_on_a_checkpoint_step_keeps_the_last_good_checkpoint(
    toy_x, tmp_path, monkeypatch, grad_clip
):
    _nan_gradient_at(monkeypatch, 19)  # step 19 completes the checkpoint at 20
    with pytest.raises(
        TrainingDiverged,
        match=r"gradient norm is nan at step 19.*checkpoint, at step 10, is intact",
    ):
        _run(_cfg(grad_clip=grad_clip), toy_x, tmp_path)
    assert _ckpt_step(tmp_path) == 10
    assert all(torch.isfinite(p).all() for p in SAE.load(tmp_path / "checkpoint").parameters())


def test_divergence_before_any_checkpoint_does_not_claim_one(toy_x, tmp_path, monkeypatch):
    _nan_gradient_at(monkeypatch, 3)
    with pytest.raises(TrainingDiverged, match="No checkpoint was written") as err:
        _run(_cfg(), toy_x, tmp_path)
    assert "intact" not in str(err.value)
    assert not (tmp_path / "checkpoint").exists()


def test_non_finite_weights_are_never_saved(toy_x, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = ReluSAE.after_step

    def after_step(self) -> None:  # noqa: ANN001
        original(self)
        calls["n"] += 1
        if calls["n"] == 20:  # after step 19, which completes the checkpoint at 20
            self.b_dec.data[0] = math.inf

    monkeypatch.setattr(ReluSAE, "after_step", after_step)
    with pytest.raises(
        TrainingDiverged, match=r"non-finite values in b_dec after step 19.*at step 10, is intact"
    ):
        _run(_cfg(log_every=100), toy_x, tmp_path)
    assert _ckpt_step(tmp_path) == 10


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs."""


def _kill_between_the_renames(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second checkpoint's save dies after ``checkpoint -> checkpoint.old``."""
    real = Path.rename

    def rename(self: Path, target):  # noqa: ANN001, ANN202
        if self.name == "checkpoint.tmp" and (self.parent / "checkpoint.old").exists():
            raise _Killed
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)


@pytest.mark.parametrize(("tmp_complete", "recovered_step"), [(True, 20), (False, 10)])
def test_kill_between_the_renames_of_a_save_recovers_the_newest_copy(
    toy_x, tmp_path, monkeypatch, tmp_complete, recovered_step
):
    full = _run(_cfg(), toy_x, tmp_path / "full")
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        _kill_between_the_renames(m)
        with pytest.raises(_Killed):
            _run(_cfg(), toy_x, out, stop_after=20)
    assert not (out / "checkpoint").exists()
    assert {p.name for p in out.iterdir()} >= {"checkpoint.old", "checkpoint.tmp"}
    if not tmp_complete:  # killed while writing the new copy: its marker is missing
        (out / "checkpoint.tmp" / "trainer_state.json").unlink()
    with pytest.warns(UserWarning, match="recovered it from the complete copy"):
        _run(_cfg(), toy_x, out, stop_after=1)
    assert _ckpt_step(out) == recovered_step + 1
    assert _same_weights(full, _run(_cfg(), toy_x, out))


# --- 3. clear errors instead of tracebacks or silence ---------------------------------------------
@pytest.mark.parametrize(
    ("damage", "detail"),
    [
        ("sae.safetensors", "sae.safetensors"),
        ("trainer_state.safetensors", "trainer_state.safetensors"),
        ("trainer_state.json", "trainer_state.json"),
        ("config.json", "config.json|Unterminated|Expecting"),
    ],
)
def test_damaged_checkpoint_on_resume_says_to_start_over(toy_x, tmp_path, damage, detail):
    _run(_cfg(), toy_x, tmp_path, stop_after=10)
    path = tmp_path / "checkpoint" / damage
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated
    with pytest.raises(ValueError, match=rf"(?s)damaged \(.*({detail}).*\).*--no-resume"):
        _run(_cfg(), toy_x, tmp_path)
    _run(_cfg(), toy_x, tmp_path, resume=False)  # the fix the message names works


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"lr_warmup_steps": -5}, "`lr_warmup_steps` must be a non-negative integer.*-5"),
        ({"lr_warmup_steps": 2.5}, "`lr_warmup_steps` must be a non-negative integer"),
        ({"grad_clip": float("nan")}, "`grad_clip` must be a finite number.*nan"),
        ({"grad_clip": float("inf")}, "`grad_clip` must be a finite number.*inf"),
        ({"adam_betas": (0.9, 1.0)}, r"`adam_betas` must be two numbers in \[0, 1\)"),
        ({"adam_betas": (-0.1, 0.9)}, r"`adam_betas` must be two numbers in \[0, 1\)"),
        ({"adam_betas": (0.9,)}, r"`adam_betas` must be two numbers"),
        ({"device": "nonsense"}, "`device` is 'nonsense', which is not a torch device"),
    ],
)
def test_bad_settings_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(architecture="relu", **setting)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--lr-warmup-steps", "-5"], "`lr_warmup_steps` must be a non-negative integer.*-5"),
        (["--grad-clip", "nan"], "`grad_clip` must be a finite number.*nan"),
    ],
)
def test_command_line_refuses_bad_warmup_and_grad_clip(toy_x, tmp_path, flag, message):
    np.save(tmp_path / "acts.npy", toy_x.numpy())
    args = ["--data", str(tmp_path / "acts.npy"), "--arch", "relu", "--out", str(tmp_path / "r")]
    args += ["--steps", "4", "--batch-size", "64", "--d_sae", "16", "--quiet", *flag]
    with pytest.raises(SystemExit, match=f"^error: train config: {message}"):
        main(args)
    assert not (tmp_path / "r").exists()  # refused before any work


def test_cuda_without_cuda_on_real_data_is_an_error_not_a_traceback(toy_x, tmp_path, monkeypatch):
    """With a readable data file (the other test's file is absent): `error:`, not torch's
    AssertionError from moving the SAE to a device that does not exist."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    np.save(tmp_path / "acts.npy", toy_x.numpy())
    args = ["--data", str(tmp_path / "acts.npy"), "--arch", "relu", "--out", str(tmp_path / "r")]
    args += ["--steps", "4", "--batch-size", "64", "--d_sae", "16", "--quiet", "--device", "cuda"]
    with pytest.raises(SystemExit, match="^error: `device` is 'cuda' but this machine has no CUDA"):
        main(args)
    assert not (tmp_path / "r" / "sae").exists()


def test_grad_clip_zero_or_less_still_disables_clipping():
    assert TrainConfig(architecture="relu", grad_clip=0).grad_clip == 0
    assert TrainConfig(architecture="relu", grad_clip=-1.0).grad_clip == -1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_fails_before_reading_data(tmp_path):
    with pytest.raises(SystemExit, match="`device` is 'cuda' but this machine has no CUDA"):
        main(
            ["--data", str(tmp_path / "absent.npy"), "--arch", "relu", "--out", str(tmp_path)]
            + ["--device", "cuda", "--quiet"]
        )


def _live_rows(live: Path) -> dict[str, str]:
    metrics = live / "plots" / "metrics"
    return {str(p.relative_to(metrics)): p.read_text() for p in sorted(metrics.rglob("*.tsv"))}


def _killed_at_checkpoint(step: int):  # noqa: ANN202
    real = train_module.save_checkpoint

    def save(out_dir, sae, opt, at, *args, **kw):  # noqa: ANN001, ANN202
        if at == step:
            raise _Killed  # after the metrics of `step` were logged, before its checkpoint
        return real(out_dir, sae, opt, at, *args, **kw)

    return save


@pytest.mark.parametrize("interruption", ["stop_after", "kill"])
def test_dvclive_rows_carry_the_step_and_survive_a_resume_unchanged(
    toy_x, tmp_path, monkeypatch, interruption
):
    cfg = _cfg(steps=45, checkpoint_every=20)
    _run(cfg, toy_x, tmp_path / "full", live_dir=tmp_path / "full" / "live")
    cut, live = tmp_path / "cut", tmp_path / "cut" / "live"
    if interruption == "stop_after":
        _run(cfg, toy_x, cut, live_dir=live, stop_after=17)
    else:
        with monkeypatch.context() as m:
            m.setattr(train_module, "save_checkpoint", _killed_at_checkpoint(40))
            with pytest.raises(_Killed):
                _run(cfg, toy_x, cut, live_dir=live)
    _run(cfg, toy_x, cut, live_dir=live)
    full = _live_rows(tmp_path / "full" / "live")
    steps = [line.split("\t")[0] for line in full["train/loss.tsv"].splitlines()]
    assert steps == ["step", "10", "20", "30", "40", "45"]
    assert _live_rows(live) == full
    summary = json.loads((live / "metrics.json").read_text())
    assert summary == json.loads((tmp_path / "full" / "live" / "metrics.json").read_text())
