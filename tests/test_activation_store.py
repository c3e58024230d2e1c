"""The sharded activation store: round trips, resume, corruption checks, the streaming loader."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import common.activations.store as store_module
from common.activations.files import load_activations
from common.activations.store import (
    ActivationStore,
    ActivationStoreWriter,
    CorruptStoreError,
    StoreBatches,
    manifest_digest,
)

META = {"model": "toy", "revision": "r0", "site": "resid_post.3", "dataset": "random"}


def _data(n: int = 1000, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 3


def _write(
    root: Path, x: torch.Tensor, *, dtype: str = "float32", shard_tokens: int = 128, pieces: int = 7
) -> ActivationStore:
    with ActivationStoreWriter(
        root, d=x.shape[1], dtype=dtype, shard_tokens=shard_tokens, metadata=META
    ) as w:
        for part in torch.tensor_split(x, pieces):  # uneven appends that straddle shards
            w.append(part)
    return ActivationStore(root)


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"),
    [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)],
)
def test_round_trip(tmp_path: Path, dtype: str, torch_dtype: torch.dtype) -> None:
    x = _data()
    store = _write(tmp_path, x, dtype=dtype)
    out = store.tensor()
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, x.to(torch_dtype).float())  # exactly the storage-dtype rounding
    assert torch.equal(store.read_rows(100, 300), out[100:300])
    idx = np.array([999, 0, 128, 5, 5, 640])
    assert torch.equal(store.gather(idx), out[torch.from_numpy(idx)])
    assert torch.equal(store.tensor(max_tokens=50), out[:50])
    assert store.d_in == 8 and store.n_tokens == len(store) == 1000


def test_manifest_contents(tmp_path: Path) -> None:
    _write(tmp_path, _data(), dtype="float16")
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["metadata"] == META and m["dtype"] == "float16" and m["d"] == 8
    assert m["complete"] is True and m["n_tokens"] == 1000 and m["shard_tokens"] == 128
    assert [s["n_tokens"] for s in m["shards"]] == [128] * 7 + [104]
    assert sorted(p.name for p in tmp_path.glob("shard_*")) == [s["file"] for s in m["shards"]]
    assert len(m["shards"][0]["sha256"]) == 64
    assert m["manifest_sha256"] == manifest_digest(m)
    assert (tmp_path / m["shards"][0]["file"]).stat().st_size == 128 * 8 * 2
    assert ActivationStore(tmp_path).metadata == META


def test_interrupted_writer_resumes_to_same_content(tmp_path: Path) -> None:
    x = _data()
    reference = _write(tmp_path / "ref", x).tensor()
    # first attempt dies after 450 rows: only the 3 full shards (384 rows) survive
    w = ActivationStoreWriter(tmp_path / "run", d=8, shard_tokens=128, metadata=META)
    w.append(x[:300])
    w.append(x[300:450])
    del w
    with pytest.raises(ValueError, match="did not finish"):
        ActivationStore(tmp_path / "run")
    (tmp_path / "run" / "shard_00003.bin.tmp").write_bytes(b"half-written")  # crash mid-shard
    w = ActivationStoreWriter(tmp_path / "run", d=8, shard_tokens=128, metadata=META)
    assert w.tokens_written == 384
    assert not (tmp_path / "run" / "shard_00003.bin.tmp").exists()
    w.append(x[w.tokens_written :])
    w.close()
    assert torch.equal(ActivationStore(tmp_path / "run").tensor(), reference)
    # re-opening a finished store is a no-op that refuses more rows
    again = ActivationStoreWriter(tmp_path / "run", d=8, shard_tokens=128, metadata=META)
    assert again.complete and again.tokens_written == 1000
    with pytest.raises(RuntimeError, match="complete"):
        again.append(x[:1])


def _flip(path: Path, at: int = 17) -> None:
    """Flip the bits of one byte in place: same size, different sha256."""
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def _shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("shard_*"))}


def test_resume_refuses_a_corrupt_shard_before_intact_ones(tmp_path: Path) -> None:
    x = _data()
    reference = _write(tmp_path / "ref", x).tensor()
    root = tmp_path / "run"
    w = ActivationStoreWriter(root, d=8, shard_tokens=128, metadata=META)
    w.append(x[:600])  # 4 full shards, then the process dies
    del w
    _flip(root / "shard_00001.bin")
    before, manifest = _shard_bytes(root), (root / "manifest.json").read_bytes()
    with pytest.raises(
        CorruptStoreError,
        match=r"shard_00001\.bin fails its sha256 checksum: expected [0-9a-f]{64}, found "
        r"[0-9a-f]{64}\. Later shards are intact.*delete shard_00001\.bin and every later shard",
    ):
        ActivationStoreWriter(root, d=8, shard_tokens=128, metadata=META)
    assert _shard_bytes(root) == before and (root / "manifest.json").read_bytes() == manifest
    # the fix the message gives: delete the damaged shard and the later ones, then resume
    for name in ("shard_00001.bin", "shard_00002.bin", "shard_00003.bin"):
        (root / name).unlink()
    w = ActivationStoreWriter(root, d=8, shard_tokens=128, metadata=META)
    assert w.tokens_written == 128
    w.append(x[128:])
    w.close()
    assert torch.equal(ActivationStore(root).tensor(), reference)


def test_reopening_a_complete_store_keeps_the_shards_after_a_bad_one(tmp_path: Path) -> None:
    _write(tmp_path, _data(300))  # 3 shards: 128, 128, 44 rows
    _flip(tmp_path / "shard_00001.bin")
    before, manifest = _shard_bytes(tmp_path), (tmp_path / "manifest.json").read_bytes()
    with pytest.raises(CorruptStoreError, match=r"shard_00001\.bin fails.*nothing was changed"):
        ActivationStoreWriter(tmp_path, d=8, shard_tokens=128, metadata=META)
    assert _shard_bytes(tmp_path) == before
    assert (tmp_path / "manifest.json").read_bytes() == manifest


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_resume_rewrites_damaged_shards_at_the_end(tmp_path: Path, damage: str) -> None:
    x = _data(300)
    reference = _write(tmp_path / "ref", x).tensor()
    _write(tmp_path / "run", x)
    last = tmp_path / "run" / "shard_00002.bin"
    if damage == "flip":
        _flip(last)
    elif damage == "truncate":
        last.write_bytes(last.read_bytes()[:-5])
    else:
        last.unlink()
    w = ActivationStoreWriter(tmp_path / "run", d=8, shard_tokens=128, metadata=META)
    assert not w.complete and w.tokens_written == 256
    w.append(x[256:])
    w.close()
    assert torch.equal(ActivationStore(tmp_path / "run").tensor(), reference)


def test_metadata_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    w = ActivationStoreWriter(tmp_path, d=8, shard_tokens=128, metadata=META)
    w.append(_data(200))
    with pytest.raises(ValueError, match=r"metadata\.site.*Delete the folder"):
        ActivationStoreWriter(
            tmp_path, d=8, shard_tokens=128, metadata={**META, "site": "mlp_out.3"}
        )
    with pytest.raises(ValueError, match=r"dtype: on disk 'float32', requested 'float16'"):
        ActivationStoreWriter(tmp_path, d=8, dtype="float16", shard_tokens=128, metadata=META)


def test_bad_appends(tmp_path: Path) -> None:
    w = ActivationStoreWriter(tmp_path, d=8, dtype="float16", metadata=META)
    with pytest.raises(ValueError, match=r"\(n_tokens, 8\)"):
        w.append(torch.zeros(4, 9))
    with pytest.raises(ValueError, match="overflows"):
        w.append(torch.full((2, 8), 1e6))
    bad = torch.zeros(3, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        w.append(bad)
    assert w.tokens_written == 0  # rejected rows were not buffered
    with pytest.raises(ValueError, match="unsupported store dtype"):
        ActivationStoreWriter(tmp_path / "b", d=8, dtype="int8", metadata=META)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not an activation store.*run extraction first"):
        ActivationStore(tmp_path)


def test_corrupt_byte_found_by_verify(tmp_path: Path) -> None:
    store = _write(tmp_path, _data())
    store.verify()  # a clean store passes
    path = tmp_path / "shard_00005.bin"
    raw = bytearray(path.read_bytes())
    raw[1000] ^= 0x01
    path.write_bytes(bytes(raw))
    store = ActivationStore(tmp_path)  # same size: the cheap check at open passes
    with pytest.raises(CorruptStoreError, match=r"shard_00005\.bin fails its sha256.*re-run"):
        store.verify()


def _assert_reads_fail(root: Path, match: str) -> None:
    """Every way of reading the store raises ``CorruptStoreError`` matching ``match``."""
    store = ActivationStore(root)  # sizes are right: opening stays cheap
    with pytest.raises(CorruptStoreError, match=match):
        store.tensor()
    with pytest.raises(CorruptStoreError, match=match):
        store.gather(np.arange(store.n_tokens))
    with pytest.raises(CorruptStoreError, match=match):
        _ = [b for _, b in zip(range(40), _loader(store).iterate(0), strict=False)]  # 2 epochs
    with pytest.raises(ValueError, match=match):
        load_activations(root)


def test_a_flipped_byte_fails_the_first_read(tmp_path: Path) -> None:
    _write(tmp_path, _data())
    m = json.loads((tmp_path / "manifest.json").read_text())
    _flip(tmp_path / "shard_00003.bin", at=1000)
    expected = m["shards"][3]["sha256"]
    _assert_reads_fail(
        tmp_path,
        rf"shard_00003\.bin fails its sha256 checksum: expected {expected}, found (?!{expected})"
        r"[0-9a-f]{64}\. Delete shard_00003\.bin and every later shard, then re-run",
    )


def test_a_shard_changed_after_it_was_read_is_hashed_again(tmp_path: Path) -> None:
    x = _data()
    store = _write(tmp_path, x)
    assert torch.equal(store.tensor(), x)
    _flip(tmp_path / "shard_00007.bin")  # within the same clock tick, possibly
    with pytest.raises(CorruptStoreError, match=r"shard_00007\.bin fails.*Re-run the extraction"):
        store.read_rows(900, 1000)


def test_training_hashes_each_shard_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _write(tmp_path, _data())
    monkeypatch.setattr(store_module, "_VERIFIED", set())
    monkeypatch.setattr(store_module, "_RACY_NS", -(10**18))  # remember even fresh files
    hashed: list[str] = []
    sha256_file = store_module._sha256_file

    def spy(path: Path, block: int = 1 << 24) -> str:
        hashed.append(path.name)
        return sha256_file(path, block)

    monkeypatch.setattr(store_module, "_sha256_file", spy)
    loader = _loader(store)
    for _, _b in zip(range(60), loader.iterate(0), strict=False):  # 3 epochs, 18 windows
        pass
    store.tensor()
    ActivationStore(tmp_path).batches(64).sample(100)
    assert sorted(hashed) == [s["file"] for s in store.shards]  # each shard once
    store.verify()  # verify() always hashes again
    assert len(hashed) == 2 * len(store.shards)


def _edit_manifest(root: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def _halve_d(m: dict[str, Any]) -> None:
    """The edit of the issue: d halved, every row count doubled; sizes stay consistent."""
    m["d"] //= 2
    m["n_tokens"] *= 2
    m["shard_tokens"] *= 2
    for shard in m["shards"]:
        shard["n_tokens"] *= 2


def test_a_self_consistent_manifest_edit_is_caught(tmp_path: Path) -> None:
    _write(tmp_path, _data())
    _edit_manifest(tmp_path, _halve_d)
    with pytest.raises(CorruptStoreError, match="does not match its own checksum.*Delete the"):
        ActivationStore(tmp_path)
    with pytest.raises(CorruptStoreError, match="does not match its own checksum"):
        ActivationStoreWriter(tmp_path, d=4, shard_tokens=256, metadata=META)


def test_manifests_without_their_own_checksum_still_open(tmp_path: Path) -> None:
    x = _data()
    _write(tmp_path, x, dtype="bfloat16")
    _edit_manifest(tmp_path, lambda m: m.pop("manifest_sha256"))  # as written before it existed
    store = ActivationStore(tmp_path)
    store.verify()
    assert torch.equal(store.tensor(), x.bfloat16().float())
    w = ActivationStoreWriter(tmp_path, d=8, dtype="bfloat16", shard_tokens=128, metadata=META)
    assert w.complete and w.tokens_written == 1000
    # without it, the edit that keeps shard_tokens is still caught by the shard layout
    _edit_manifest(tmp_path, lambda m: (_halve_d(m), m.update(shard_tokens=128)))
    with pytest.raises(CorruptStoreError, match="holds 256 tokens; .* exactly shard_tokens=128"):
        ActivationStore(tmp_path)


def _set_shard(i: int, **fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["shards"][i].update(fields)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.pop("complete"), "missing key 'complete' in manifest.json"),
        (lambda m: m.pop("shards"), "missing key 'shards'"),
        (lambda m: m.update(d="8"), r"'d' must be an integer >= 1, found '8'"),
        (lambda m: m.update(d=0), r"'d' must be an integer >= 1, found 0"),
        (lambda m: m.update(dtype="int8"), "unsupported dtype 'int8'"),
        (lambda m: m.update(complete="yes"), "'complete' must be true or false"),
        (
            lambda m: m.update(n_tokens=999),
            "the shards hold 1000 tokens in all but n_tokens says 999",
        ),
        (lambda m: m.update(shards={}), "'shards' must be a list"),
        (_set_shard(2, file="../shard_00002.bin"), "'../shard_00002.bin' leaves the store folder"),
        (_set_shard(2, file="/tmp/x.bin"), "'/tmp/x.bin' leaves the store folder"),
        (_set_shard(2, file="shard_00001.bin"), "file 'shard_00001.bin' is listed twice"),
        (_set_shard(2, n_tokens=-1), "'n_tokens' must be an integer >= 1, found -1"),
        (_set_shard(2, sha256="abc"), "'sha256' must be 64 lowercase hex digits"),
        (lambda m: m["shards"][2].pop("sha256"), "shard entry 2: missing key 'sha256'"),
        (_set_shard(7, n_tokens=200), "holds 200 tokens; this shard must hold at most"),
    ],
)
def test_malformed_manifest_is_a_clear_error(
    tmp_path: Path, edit: Callable[[dict[str, Any]], Any], match: str
) -> None:
    _write(tmp_path, _data())
    _edit_manifest(tmp_path, edit)
    with pytest.raises(CorruptStoreError, match=match + r".*Delete the store folder"):
        ActivationStore(tmp_path)
    with pytest.raises(CorruptStoreError, match=match):
        ActivationStoreWriter(tmp_path, d=8, shard_tokens=128, metadata=META)


@pytest.mark.parametrize(
    ("text", "match"),
    [("", "the manifest is empty"), ("{", "not valid JSON"), ("[]", "must be a JSON object")],
)
def test_unreadable_manifest_is_a_clear_error(tmp_path: Path, text: str, match: str) -> None:
    _write(tmp_path, _data())
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(CorruptStoreError, match=match + r".*Delete the store folder"):
        ActivationStore(tmp_path)


def test_shard_paths_stay_inside_the_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    _write(root, _data())
    (tmp_path / "outside.bin").write_bytes((root / "shard_00000.bin").read_bytes())
    _edit_manifest(root, _set_shard(0, file="../outside.bin"))
    with pytest.raises(CorruptStoreError, match="leaves the store folder"):
        ActivationStore(root)


def test_truncated_shard_fails_at_open(tmp_path: Path) -> None:
    _write(tmp_path, _data())
    path = tmp_path / "shard_00002.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CorruptStoreError, match=r"shard_00002\.bin is truncated"):
        ActivationStore(tmp_path)
    path.unlink()
    with pytest.raises(CorruptStoreError, match=r"shard_00002\.bin is missing"):
        ActivationStore(tmp_path)


# --- loader ---------------------------------------------------------------------------------------
def _loader(store: ActivationStore, batch_size: int = 50, seed: int = 0) -> StoreBatches:
    return store.batches(batch_size, seed=seed, chunk_tokens=32, buffer_tokens=200)


def test_loader_is_deterministic_and_resumes(tmp_path: Path) -> None:
    store = _write(tmp_path, _data(), dtype="bfloat16")
    a = _loader(store)
    run = [b for _, b in zip(range(45), a.iterate(0), strict=False)]  # crosses 2 epochs
    assert all(b.shape == (50, 8) and b.dtype == torch.float32 for b in run)
    b = _loader(store)
    resumed = [x for _, x in zip(range(15), b.iterate(30), strict=False)]
    assert all(torch.equal(x, y) for x, y in zip(resumed, run[30:], strict=True))
    # 32 chunks of <= 32 rows, 6 per window: 6 windows an epoch. Steps 30-44 are rows 500-1000 of
    # epoch 1 and 0-250 of epoch 2: at most 4 + 2 windows, while the run from 0 read 2 epochs more.
    assert b.windows_loaded <= 6 and a.windows_loaded >= 12
    assert torch.equal(_loader(store).batch(17), run[17])
    other = _loader(store, seed=1).batch(0)
    assert not torch.equal(other, run[0])
    assert not torch.equal(run[0], run[20])  # epoch 1 is a fresh shuffle of epoch 0


def _row_ids(x: torch.Tensor, reference: torch.Tensor) -> list[int]:
    key = {tuple(r.tolist()): i for i, r in enumerate(reference)}
    return [key[tuple(r.tolist())] for r in x]


def test_loader_covers_every_token_once_per_epoch(tmp_path: Path) -> None:
    x = _data(1000)
    store = _write(tmp_path, x)
    loader = _loader(store, batch_size=40)  # 40 divides 1000
    ids = [i for step in range(50) for i in _row_ids(loader.batch(step), x)]  # 2 epochs
    assert sorted(ids[:1000]) == list(range(1000))
    assert sorted(ids[1000:]) == list(range(1000))
    assert ids[:1000] != ids[1000:]
    # the shuffle mixes shards: the first batch holds rows from several shards
    assert len({i // 128 for i in ids[:40]}) >= 3


def test_loader_memory_is_bounded_by_the_window(tmp_path: Path) -> None:
    store = _write(tmp_path, _data(1000))
    loader = store.batches(64, seed=0, chunk_tokens=32, buffer_tokens=100)
    reads: list[int] = []
    original = loader._load_window

    def spy(epoch: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        buffer, perm = original(epoch, w)
        reads.append(buffer.nbytes)
        return buffer, perm

    loader._load_window = spy  # type: ignore[method-assign]
    for _, _b in zip(range(40), loader.iterate(0), strict=False):
        pass
    assert loader.buffer_tokens == 96  # 3 chunks of 32
    assert loader.peak_buffer_rows <= 96 < store.n_tokens
    assert max(reads) <= 96 * 8 * 4
    assert loader.windows_loaded >= 1000 * 2 // 96  # it streamed through 2.5 epochs of windows


def test_loader_sample_and_buffer_from_bytes(tmp_path: Path) -> None:
    x = _data(1000)
    store = _write(tmp_path, x, dtype="float16")
    loader = store.batches(32, seed=3, chunk_tokens=16, buffer_bytes=100 * 8 * 2)
    assert loader.buffer_tokens == 96  # 100 rows fit, rounded down to whole chunks
    s1, s2 = loader.sample(300), store.batches(32, seed=3).sample(300)
    assert torch.equal(s1, s2) and s1.shape == (300, 8)
    assert len(set(_row_ids(s1, x.half().float()))) == 300  # distinct rows
    assert store.batches(32).sample(5000).shape == (1000, 8)
    with pytest.raises(ValueError, match="batch_size"):
        store.batches(0)


def test_train_cli_on_a_store(tmp_path: Path) -> None:
    from common.train import main

    _write(tmp_path / "store", _data(512, d=8), dtype="float16")
    main(
        [
            "--data",
            str(tmp_path / "store"),
            "--arch",
            "relu",
            "--set",
            "d_sae=16",
            "--steps",
            "6",
            "--batch-size",
            "64",
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ]
    )
    assert (tmp_path / "run" / "sae").is_dir()


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("flip", r"error: .*shard_00001\.bin fails its sha256 checksum"),
        ("manifest", r"error: .*missing key 'complete' in manifest\.json"),
    ],
)
def test_train_cli_on_a_damaged_store(tmp_path: Path, damage: str, match: str) -> None:
    from common.train import main

    _write(tmp_path / "store", _data(512, d=8), dtype="float16")
    if damage == "flip":
        _flip(tmp_path / "store" / "shard_00001.bin")
    else:
        _edit_manifest(tmp_path / "store", lambda m: m.pop("complete"))
    argv = ["--data", str(tmp_path / "store"), "--arch", "relu", "--set", "d_sae=16"]
    argv += ["--steps", "6", "--batch-size", "64", "--out", str(tmp_path / "run"), "--quiet"]
    with pytest.raises(SystemExit, match=match):
        main(argv)


def test_evals_cli_on_a_damaged_store(tmp_path: Path) -> None:
    """The evaluation reads a store through the same checksum check: a flipped byte in one shard
    is an ``error:`` naming the shard, and no metrics are written from the damaged data."""
    from common.evals.evaluate import main
    from common.sae.registry import build_sae

    sae = build_sae("relu", d_in=8, d_sae=16).save(tmp_path / "sae")
    _write(tmp_path / "store", _data(512, d=8))
    _flip(tmp_path / "store" / "shard_00001.bin")
    out = tmp_path / "metrics.json"
    argv = ["--sae", str(sae), "--data", str(tmp_path / "store"), "--out", str(out)]
    with pytest.raises(SystemExit, match=r"^error: .*shard_00001\.bin fails its sha256 checksum"):
        main(argv)
    assert not out.exists()
