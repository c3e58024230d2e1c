"""The sharded on-disk activation store and its streaming, shuffled loader.

Layout of a store folder::

    manifest.json        metadata (model, revision, site, dataset, ...), d, dtype, shard list
                         (file, n_tokens, sha256), n_tokens, complete, manifest_sha256
    shard_00000.bin      raw little-endian rows, (n_tokens, d), memory-mappable with numpy
    shard_00001.bin      ...

Every shard but the last holds exactly ``shard_tokens`` rows. fp32 and fp16 are stored as such;
bf16 is stored as its raw 16 bits (``uint16``) because numpy has no bfloat16.

Writing (``ActivationStoreWriter``) is resumable: the manifest is rewritten atomically after every
shard, so an interrupted extraction leaves a valid prefix of checksummed shards, and re-opening the
writer reports ``tokens_written`` so the extractor skips that many tokens.

Reading (``ActivationStore``) checks the manifest's consistency and the file sizes at open, and
each shard's sha256 the first time the process reads it (``verify()`` re-checks every shard).
``manifest_sha256`` (absent from older manifests, which still open) is a checksum of the manifest
itself, so that an edit which keeps the sizes consistent (d halved, n_tokens doubled) is caught.
``batches()`` streams shuffled fp32 batches with bounded memory; batch ``t`` is a pure function of
``(seed, t)`` so that training resumes exactly (the ``BatchSource`` protocol of ``common.train``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import Any, Self

import numpy as np
import torch
from torch import Tensor

MANIFEST = "manifest.json"
FORMAT = "sae-activation-store"
VERSION = 1
_SHARD_RE = re.compile(r"^shard_\d{5,}\.bin(\.tmp)?$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MANIFEST_DIGEST = "manifest_sha256"
_REQUIRED = ("d", "dtype", "shard_tokens", "shards", "n_tokens", "complete", "metadata")
_MANIFEST_FIX = "Delete the store folder and re-run the extraction to write it again."

# Shards whose checksum this process has verified: (st_dev, st_ino, size, mtime_ns, ctime_ns, sha).
# A file changed within _RACY_NS of its hashing is not remembered (its timestamp could equal the
# next change's), so it is hashed again at its next read.
_VERIFIED: set[tuple[int, int, int, int, int, str]] = set()
_RACY_NS = 2_000_000_000

# storage dtype name -> (numpy dtype on disk, torch dtype it represents)
STORAGE_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype("<f4"), torch.float32),
    "float16": (np.dtype("<f2"), torch.float16),
    "bfloat16": (np.dtype("<u2"), torch.bfloat16),
}


class CorruptStoreError(ValueError):
    """A shard is missing, truncated or fails its checksum, or the manifest is inconsistent."""


def _check_dtype(dtype: str) -> tuple[np.dtype, torch.dtype]:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"unsupported store dtype {dtype!r}; use one of {sorted(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[dtype]


def to_storage(x: Tensor, dtype: str) -> np.ndarray:
    """fp32 rows -> the on-disk numpy array (bf16 as its raw uint16 bits).

    Raises ``ValueError`` on NaN/Inf after the conversion (fp16 overflows above 65504).
    """
    np_dtype, torch_dtype = _check_dtype(dtype)
    y = x.detach().to("cpu", torch_dtype).contiguous()
    if y.numel():
        lo, hi = torch.aminmax(y)  # NaN and +-Inf reach the extremes; far cheaper than isfinite
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise ValueError(
                f"NaN/Inf in the activations after conversion to {dtype} (fp16 overflows above "
                "65504; use dtype='bfloat16' or 'float32', or drop those rows)"
            )
    if torch_dtype == torch.bfloat16:
        return y.view(torch.int16).numpy().view(np_dtype)
    return y.numpy()


def from_storage(a: np.ndarray, dtype: str, *, copy: bool = True) -> Tensor:
    """On-disk numpy rows -> an fp32 tensor; ``copy=False`` may share fp32 memory with ``a``.

    bf16 is widened exactly: its 16 bits are the high half of the fp32 bit pattern.
    """
    _, torch_dtype = _check_dtype(dtype)
    fresh = not a.flags.writeable or not a.flags.c_contiguous  # e.g. a read-only memory map
    if fresh:
        a = np.array(a, order="C")
    if torch_dtype == torch.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float()
    t = torch.from_numpy(a)
    if torch_dtype != torch.float32:
        return t.float()
    return t.clone() if copy and not fresh else t


def _sha256_file(path: Path, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _normalise_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(metadata, dict):
        raise TypeError(
            f"metadata must be a dict (model, site, dataset, ...), got {type(metadata).__name__}"
        )
    try:
        return json.loads(json.dumps(metadata, sort_keys=True))  # tuples -> lists, as on disk
    except TypeError as err:
        raise TypeError(
            f"metadata must be JSON-serialisable (str/int/float/list/dict): {err}"
        ) from err


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The sha256 of the manifest's canonical JSON, without its own ``manifest_sha256`` field."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _read_manifest(root: Path) -> dict[str, Any]:
    """Load ``root/manifest.json`` and check its consistency (``_check_manifest``)."""
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} is not an activation store (no {MANIFEST}); run extraction first "
            "(common.activations.extract) or point to the folder it wrote."
        )
    text = path.read_text()
    if not text.strip():
        raise CorruptStoreError(f"{path}: the manifest is empty. {_MANIFEST_FIX}")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise CorruptStoreError(
            f"{path}: the manifest is not valid JSON ({err}). {_MANIFEST_FIX}"
        ) from err
    if not isinstance(manifest, dict):
        raise CorruptStoreError(
            f"{path}: the manifest must be a JSON object, found {type(manifest).__name__}. "
            f"{_MANIFEST_FIX}"
        )
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not an activation-store manifest (format={manifest.get('format')!r})"
        )
    if manifest.get("version") != VERSION:
        raise ValueError(
            f"{path}: store version {manifest.get('version')}, this code reads version {VERSION}"
        )
    _check_manifest(path, manifest)
    return manifest


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_manifest(path: Path, m: dict[str, Any]) -> None:
    """Raise ``CorruptStoreError`` unless the manifest's fields agree with each other and, when
    it has one (stores written before it do not), with its ``manifest_sha256``."""

    def bad(problem: str) -> CorruptStoreError:
        return CorruptStoreError(f"{path}: {problem}. {_MANIFEST_FIX}")

    for key in _REQUIRED:
        if key not in m:
            raise bad(f"missing key {key!r} in {MANIFEST}")
    for key, minimum in (("d", 1), ("shard_tokens", 1), ("n_tokens", 0)):
        if not _is_int(m[key], minimum):
            raise bad(f"{key!r} must be an integer >= {minimum}, found {m[key]!r}")
    if m["dtype"] not in STORAGE_DTYPES:
        raise bad(f"unsupported dtype {m['dtype']!r}; a store holds {sorted(STORAGE_DTYPES)}")
    if not isinstance(m["complete"], bool):
        raise bad(f"'complete' must be true or false, found {m['complete']!r}")
    if not isinstance(m["metadata"], dict):
        raise bad(f"'metadata' must be an object, found {m['metadata']!r}")
    if not isinstance(m["shards"], list):
        raise bad(f"'shards' must be a list, found {type(m['shards']).__name__}")
    seen: set[str] = set()
    n_shards = len(m["shards"])
    for i, shard in enumerate(m["shards"]):
        if problem := _shard_entry_problem(shard, m["shard_tokens"], last=i == n_shards - 1):
            raise bad(f"shard entry {i}: {problem}")
        if shard["file"] in seen:
            raise bad(f"shard entry {i}: file {shard['file']!r} is listed twice")
        seen.add(shard["file"])
    total = sum(s["n_tokens"] for s in m["shards"])
    if total != m["n_tokens"]:
        raise bad(f"the shards hold {total} tokens in all but n_tokens says {m['n_tokens']}")
    if MANIFEST_DIGEST in m and (found := manifest_digest(m)) != m[MANIFEST_DIGEST]:
        raise bad(
            f"the manifest does not match its own checksum (manifest_sha256 {m[MANIFEST_DIGEST]!r}"
            f", its content hashes to {found!r}): it was edited or damaged"
        )


def _shard_entry_problem(shard: Any, shard_tokens: int, *, last: bool) -> str | None:
    """What is wrong with one ``shards`` entry of a manifest, or ``None``."""
    if not isinstance(shard, dict):
        return f"expected an object with file, n_tokens, sha256, found {shard!r}"
    for key in ("file", "n_tokens", "sha256"):
        if key not in shard:
            return f"missing key {key!r}"
    file = shard["file"]
    if not isinstance(file, str) or not file:
        return f"'file' must be a file name, found {file!r}"
    if PurePosixPath(file).is_absolute() or ".." in PurePosixPath(file).parts:
        return f"'file' {file!r} leaves the store folder; shard files are relative names inside it"
    n = shard["n_tokens"]
    if not _is_int(n, 1):
        return f"'n_tokens' must be an integer >= 1, found {n!r}"
    if n > shard_tokens or (n != shard_tokens and not last):
        rule = "at most" if last else "exactly"
        return f"{file} holds {n} tokens; this shard must hold {rule} shard_tokens={shard_tokens}"
    if not isinstance(shard["sha256"], str) or not _SHA256_RE.match(shard["sha256"]):
        return f"'sha256' must be 64 lowercase hex digits, found {shard['sha256']!r}"
    return None


def _size_problem(root: Path, shard: dict[str, Any], row_bytes: int) -> str | None:
    path = root / shard["file"]
    expected = shard["n_tokens"] * row_bytes
    if not path.is_file():
        return f"shard {shard['file']} is missing"
    size = path.stat().st_size
    if size != expected:
        return f"shard {shard['file']} is truncated or damaged: {size} bytes, expected {expected}"
    return None


def _file_state(path: Path) -> tuple[int, int, int, int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _checksum_problem(root: Path, shard: dict[str, Any], *, remembered: bool = True) -> str | None:
    """Compare a shard file's sha256 with the manifest's; ``None`` when it matches.

    With ``remembered`` a shard this process already verified (same file, size and timestamps) is
    not hashed again, so that streaming a store hashes each shard once per process.
    """
    path = root / shard["file"]
    try:
        before = _file_state(path)
    except FileNotFoundError:
        return f"shard {shard['file']} is missing"
    key = (*before, shard["sha256"])
    if remembered and key in _VERIFIED:
        return None
    started = time.time_ns()
    found = _sha256_file(path)
    if found != shard["sha256"]:
        _VERIFIED.discard(key)
        return (
            f"shard {shard['file']} fails its sha256 checksum: expected {shard['sha256']}, "
            f"found {found}"
        )
    if _file_state(path) == before and before[4] < started - _RACY_NS:
        _VERIFIED.add(key)
    return None


def _shard_problem(root: Path, shard: dict[str, Any], row_bytes: int) -> str | None:
    """Size, then checksum (remembered per process): what is wrong with a shard, or ``None``."""
    return _size_problem(root, shard, row_bytes) or _checksum_problem(root, shard)


# --- writing -------------------------------------------------------------------------------------
class ActivationStoreWriter:
    """Append fp32 activation rows; write fixed-size shards and an atomically updated manifest.

    ``ActivationStoreWriter(root, d=576, dtype="float16", metadata={...})``. Re-opening a folder
    with an unfinished store (same metadata, d, dtype, shard_tokens) keeps its finished shards
    after checking their checksums, and ``tokens_written`` says how many tokens to skip. Damaged
    shards at the end (missing, truncated, failing their checksum) are dropped and written again;
    a damaged shard followed by good ones is refused with ``CorruptStoreError`` and nothing is
    deleted. Re-opening a complete store gives ``complete == True`` and refuses ``append``. Rows
    buffered but not yet in a shard are lost on a crash; the resume point is always a shard
    boundary.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        d: int,
        dtype: str = "float32",
        shard_tokens: int = 65536,
        metadata: dict[str, Any],
    ) -> None:
        if not isinstance(d, int) or d <= 0:
            raise ValueError(f"d must be a positive integer, got {d!r}")
        if not isinstance(shard_tokens, int) or shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
        self.np_dtype, _ = _check_dtype(dtype)
        self.root, self.d, self.dtype, self.shard_tokens = Path(root), d, dtype, shard_tokens
        self.metadata = _normalise_metadata(metadata)
        self.root.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict[str, Any]] = []
        self.complete = False
        if (self.root / MANIFEST).exists():
            self._resume()
        self._remove_stray_shards()
        self._buffer = np.empty((0, d), dtype=self.np_dtype)
        self._filled = 0
        if not self.complete:
            self._buffer = np.empty((shard_tokens, d), dtype=self.np_dtype)
            self._write_manifest()

    # the settings that must match to resume
    def _settings(self) -> dict[str, Any]:
        return {
            "metadata": self.metadata,
            "d": self.d,
            "dtype": self.dtype,
            "shard_tokens": self.shard_tokens,
        }

    def _resume(self) -> None:
        old = _read_manifest(self.root)
        mine = self._settings()
        diff = [k for k in mine if k != "metadata" and old.get(k) != mine[k]]
        old_meta = old.get("metadata", {})
        keys = sorted(set(old_meta) | set(self.metadata))
        diff += [f"metadata.{k}" for k in keys if old_meta.get(k) != self.metadata.get(k)]
        if diff:
            details = "; ".join(
                f"{k}: on disk {self._lookup(old, k)!r}, requested {self._lookup(mine, k)!r}"
                for k in diff
            )
            raise ValueError(
                f"{self.root} already holds an activation store written with different settings "
                f"({details}). Delete the folder to re-extract, or choose another output path."
            )
        self.shards = self._intact_prefix(old["shards"])
        self.complete = old["complete"] and len(self.shards) == len(old["shards"])
        if not self.complete:  # an unfinished store continues after its last full shard
            full = [s["n_tokens"] == self.shard_tokens for s in self.shards] + [False]
            self.shards = self.shards[: full.index(False)]

    def _intact_prefix(self, shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The shards before the first damaged one, if every shard from there on is damaged.

        A damaged shard followed by an intact one raises ``CorruptStoreError``: extraction can
        only continue from the end, so resuming would delete the intact shards.
        """
        row_bytes = self.d * self.np_dtype.itemsize
        problems = [_shard_problem(self.root, shard, row_bytes) for shard in shards]
        damaged = [i for i, problem in enumerate(problems) if problem]
        if damaged and damaged != list(range(damaged[0], len(shards))):
            first = shards[damaged[0]]["file"]
            details = "; ".join(str(problems[i]) for i in damaged)
            raise CorruptStoreError(
                f"{self.root}: {details}. Later shards are intact, and resuming would delete them, "
                f"so nothing was changed. Restore the damaged shard(s), or delete {first} and "
                "every later shard and re-run the extraction with the same settings (it resumes "
                "from there), or delete the folder to re-extract everything."
            )
        return shards[: damaged[0]] if damaged else list(shards)

    @staticmethod
    def _lookup(settings: dict[str, Any], key: str) -> Any:
        if key.startswith("metadata."):
            return settings.get("metadata", {}).get(key.split(".", 1)[1])
        return settings.get(key)

    def _remove_stray_shards(self) -> None:
        keep = {s["file"] for s in self.shards}
        for path in self.root.iterdir():
            if _SHARD_RE.match(path.name) and path.name not in keep:
                path.unlink()

    @property
    def tokens_written(self) -> int:
        """Tokens appended so far: those in finished shards plus the buffered ones."""
        return sum(s["n_tokens"] for s in self.shards) + self._filled

    def append(self, x: Tensor) -> None:
        """Append ``(n, d)`` rows (any float dtype; converted to the storage dtype)."""
        if self.complete:
            raise RuntimeError(
                f"{self.root} is a complete store; nothing more can be appended. Delete the folder "
                "to re-extract, or choose another output path."
            )
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(
                f"append expects a (n_tokens, {self.d}) matrix, got shape {tuple(x.shape)}"
            )
        rows = to_storage(x, self.dtype)
        start = 0
        while start < len(rows):
            take = min(len(rows) - start, self.shard_tokens - self._filled)
            self._buffer[self._filled : self._filled + take] = rows[start : start + take]
            self._filled += take
            start += take
            if self._filled == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if self._filled == 0:
            return
        name = f"shard_{len(self.shards):05d}.bin"
        data = np.ascontiguousarray(self._buffer[: self._filled])
        tmp = self.root / (name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(memoryview(data).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / name)
        digest = hashlib.sha256(memoryview(data).cast("B")).hexdigest()
        self.shards.append({"file": name, "n_tokens": int(self._filled), "sha256": digest})
        self._filled = 0
        self._write_manifest()

    def _write_manifest(self) -> None:
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            **self._settings(),
            "byte_order": "little",
            "storage": str(self.np_dtype.name),
            "shards": self.shards,
            "n_tokens": sum(s["n_tokens"] for s in self.shards),
            "complete": self.complete,
        }
        manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
        _write_json_atomic(self.root / MANIFEST, manifest)

    def close(self) -> None:
        """Write the last (partial) shard and mark the store complete."""
        if self.complete:
            return
        if self.tokens_written == 0:
            raise ValueError(f"{self.root}: closing an empty store; append activations first")
        self._flush()
        self.complete = True
        self._buffer = np.empty((0, self.d), dtype=self.np_dtype)
        self._write_manifest()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:  # on an error leave the store unfinished so that it resumes
            self.close()


# --- reading -------------------------------------------------------------------------------------
class ActivationStore:
    """A finished store on disk: manifest and size checks at open, ``verify()``, loaders.

    Every read checks the sha256 of the shards it touches the first time this process reads them
    (``_checksum_problem``); ``verify()`` re-hashes them all. ``allow_incomplete=True`` opens an
    interrupted store (its finished shards) for inspection.
    """

    def __init__(self, root: str | Path, *, allow_incomplete: bool = False) -> None:
        self.root = Path(root)
        self.manifest = _read_manifest(self.root)
        if not self.manifest["complete"] and not allow_incomplete:
            raise ValueError(
                f"{self.root}: extraction did not finish "
                f"({self.manifest['n_tokens']} tokens so far). "
                "Re-run the extraction with the same settings: it resumes where it stopped."
            )
        self.dtype: str = self.manifest["dtype"]
        self.np_dtype, _ = _check_dtype(self.dtype)
        self.d_in: int = self.manifest["d"]
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        self.shard_sizes = np.array([s["n_tokens"] for s in self.shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)])
        self.n_tokens = int(self.shard_starts[-1])  # == manifest n_tokens (checked on reading)
        row_bytes = self.d_in * self.np_dtype.itemsize
        for i, shard in enumerate(self.shards):
            if problem := _size_problem(self.root, shard, row_bytes):
                raise self._corrupt(i, problem)

    def _corrupt(self, i: int, problem: str) -> CorruptStoreError:
        """The error for damaged shard ``i``, with the way to repair the store."""
        if i == len(self.shards) - 1:
            fix = "Re-run the extraction with the same settings: it keeps the good shards and "
            fix += "writes the last one again."
        else:
            fix = f"Delete {self.shards[i]['file']} and every later shard, then re-run the "
            fix += "extraction with the same settings (it resumes from there); or delete the "
            fix += "folder to re-extract everything."
        return CorruptStoreError(f"{self.root}: {problem}. {fix}")

    def check_shard(self, i: int) -> None:
        """Raise ``CorruptStoreError`` unless shard ``i`` matches its sha256 (hashed once per
        process while the file is unchanged)."""
        if problem := _checksum_problem(self.root, self.shards[i]):
            raise self._corrupt(i, problem)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.manifest["metadata"]

    @property
    def nbytes(self) -> int:
        return self.n_tokens * self.d_in * self.np_dtype.itemsize

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.root)!r}, n_tokens={self.n_tokens}, d={self.d_in}, "
            f"dtype={self.dtype})"
        )

    def verify(self) -> None:
        """Check the manifest, then every shard's size and sha256 (always hashed again); raise
        ``CorruptStoreError`` naming the first problem."""
        _check_manifest(self.root / MANIFEST, self.manifest)
        row_bytes = self.d_in * self.np_dtype.itemsize
        for i, shard in enumerate(self.shards):
            problem = _size_problem(self.root, shard, row_bytes)
            if problem or (problem := _checksum_problem(self.root, shard, remembered=False)):
                raise self._corrupt(i, problem)

    def shard_array(self, i: int) -> np.ndarray:
        """Shard ``i`` as a read-only ``np.memmap`` of storage dtype (bf16 shows as uint16),
        after ``check_shard(i)``."""
        self.check_shard(i)
        shard = self.shards[i]
        return np.memmap(
            self.root / shard["file"],
            dtype=self.np_dtype,
            mode="r",
            shape=(shard["n_tokens"], self.d_in),
        )

    def read_rows(self, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of the whole store, in order, as fp32."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"rows [{start}, {stop}) outside the store's {self.n_tokens} tokens")
        parts = []
        first = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        for i in range(max(first, 0), len(self.shards)):
            lo, hi = self.shard_starts[i], self.shard_starts[i + 1]
            if lo >= stop:
                break
            a, b = max(start, lo) - lo, min(stop, hi) - lo
            if b > a:
                parts.append(from_storage(self.shard_array(i)[a:b], self.dtype))
        return torch.cat(parts) if parts else torch.empty(0, self.d_in)

    def gather(self, index: np.ndarray) -> Tensor:
        """Rows at the given global indices (any order, repeats allowed), as fp32."""
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.n_tokens):
            raise IndexError(f"row index outside the store's {self.n_tokens} tokens")
        out = torch.empty(len(index), self.d_in)
        shard_of = np.searchsorted(self.shard_starts, index, side="right") - 1
        for i in np.unique(shard_of):
            where = np.nonzero(shard_of == i)[0]
            local = index[where] - self.shard_starts[i]
            order = np.argsort(local, kind="stable")  # read the memory map front to back
            rows = self.shard_array(int(i))[local[order]]
            out[torch.from_numpy(where[order])] = from_storage(rows, self.dtype)
        return out

    def tensor(self, max_tokens: int | None = None) -> Tensor:
        """The first ``max_tokens`` (default: all) tokens in memory as fp32; for small stores."""
        n = self.n_tokens if max_tokens is None else min(max_tokens, self.n_tokens)
        return self.read_rows(0, n)

    def batches(
        self,
        batch_size: int,
        seed: int = 0,
        *,
        chunk_tokens: int = 2048,
        buffer_bytes: int = 256 * 2**20,
        buffer_tokens: int | None = None,
    ) -> StoreBatches:
        """A shuffled streaming ``BatchSource`` over this store (see ``StoreBatches``)."""
        if buffer_tokens is None:
            buffer_tokens = max(1, buffer_bytes // (self.d_in * self.np_dtype.itemsize))
        return StoreBatches(
            self, batch_size, seed, chunk_tokens=chunk_tokens, buffer_tokens=buffer_tokens
        )


# --- streaming loader ----------------------------------------------------------------------------
class StoreBatches:
    """Shuffled fp32 batches streamed from an ``ActivationStore``; batch ``t`` depends on (seed, t).

    Two-level shuffle. The store is cut into chunks of ``chunk_tokens`` consecutive rows (chunks
    never cross shards). Epoch ``e`` orders all chunks by a permutation drawn from ``(seed, e)`` and
    groups them into windows of ``buffer_tokens // chunk_tokens`` chunks; window ``w`` is read into
    one buffer (plain file reads, no lasting memory map) and its rows are permuted by a permutation
    drawn from ``(seed, e, w)``. The epoch is the concatenation of the permuted windows and batch
    ``t`` is positions ``[t*B, (t+1)*B)`` of the endless sequence of epochs, so any batch can be
    rebuilt from ``(seed, t)`` alone: resuming at step ``t`` reads only the window holding ``t*B``.

    The batches also depend on the store's shard layout and on ``chunk_tokens`` / ``buffer_tokens``
    (the defaults derive from the store's d and dtype), so a resumed run must keep those.

    Every row appears exactly once per epoch. Memory: one buffer of at most ``buffer_tokens`` rows
    in the storage dtype (256 MiB by default) plus the batch.

    Shuffling trade-off: within a window the order is uniformly random; across windows it is not.
    A batch draws from the chunks of one window only (about 110 chunks for d=576 fp16 with the
    defaults, 55 for fp32), each a run of consecutive tokens from a few documents, so tokens in a
    batch are more correlated than under a global shuffle. Smaller ``chunk_tokens`` or a larger
    buffer lowers this at the cost of smaller reads or more memory. A batch at a window boundary
    takes the tail of one window and the head of the next.
    """

    def __init__(
        self,
        store: ActivationStore,
        batch_size: int,
        seed: int = 0,
        *,
        chunk_tokens: int = 2048,
        buffer_tokens: int = 65536,
    ) -> None:
        for name, value in (
            ("batch_size", batch_size),
            ("chunk_tokens", chunk_tokens),
            ("buffer_tokens", buffer_tokens),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if store.n_tokens == 0:
            raise ValueError(f"{store.root}: the store holds no tokens")
        self.store, self.batch_size, self.seed = store, batch_size, seed
        self.d_in = store.d_in
        self.chunk_tokens = min(chunk_tokens, buffer_tokens)
        self.chunks_per_window = max(1, buffer_tokens // self.chunk_tokens)
        self.buffer_tokens = self.chunks_per_window * self.chunk_tokens
        # chunk table: (shard, start within shard, length)
        table = [
            (i, a, min(self.chunk_tokens, int(n) - a))
            for i, n in enumerate(store.shard_sizes)
            for a in range(0, int(n), self.chunk_tokens)
        ]
        self.chunks = np.array(table, dtype=np.int64).reshape(-1, 3)
        # cached (epoch, chunk order, window starts) and (epoch, window, buffer, row permutation)
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None
        self._window: tuple[int, int, np.ndarray, np.ndarray] | None = None
        self.windows_loaded = 0
        self.peak_buffer_rows = 0

    @property
    def steps_per_epoch(self) -> float:
        return self.store.n_tokens / self.batch_size

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
            lengths = self.chunks[order, 2]
            per_window = np.add.reduceat(lengths, np.arange(0, len(order), self.chunks_per_window))
            starts = np.concatenate([[0], np.cumsum(per_window)])
            self._epoch = (epoch, order, starts)
        return self._epoch[1], self._epoch[2]

    def _load_window(self, epoch: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        if self._window is not None and self._window[:2] == (epoch, w):
            return self._window[2], self._window[3]
        self._window = None  # free the old buffer before reading the next one
        order, starts = self._epoch_layout(epoch)
        chosen = self.chunks[order[w * self.chunks_per_window : (w + 1) * self.chunks_per_window]]
        n = int(starts[w + 1] - starts[w])
        buffer = np.empty((n, self.d_in), dtype=self.store.np_dtype)
        view = memoryview(buffer).cast("B")
        row_bytes = self.d_in * buffer.itemsize
        files: dict[int, Any] = {}
        with ExitStack() as stack:
            pos = 0
            for shard, start, length in chosen.tolist():
                if shard not in files:
                    self.store.check_shard(shard)
                    path = self.store.root / self.store.shards[shard]["file"]
                    files[shard] = stack.enter_context(open(path, "rb"))
                files[shard].seek(start * row_bytes)
                got = files[shard].readinto(view[pos * row_bytes : (pos + length) * row_bytes])
                if got != length * row_bytes:
                    raise CorruptStoreError(f"{self.store.root}: short read from shard {shard}")
                pos += length
        perm = np.random.default_rng([self.seed, epoch, w]).permutation(n)
        self._window = (epoch, w, buffer, perm)
        self.windows_loaded += 1
        self.peak_buffer_rows = max(self.peak_buffer_rows, n)
        return buffer, perm

    def batch(self, step: int) -> Tensor:
        """Batch ``step``: positions ``[step*B, (step+1)*B)`` of the shuffled epochs, as fp32."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self._positions(step * self.batch_size, self.batch_size)

    def rank_batch(self, step: int, rank: int, world_size: int) -> Tensor:
        """Rank ``rank``'s rows ``[r*B/W, (r+1)*B/W)`` of batch ``step`` (``W = world_size``),
        reading only those rows; the ranks' slices, in rank order, make up ``batch(step)``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if self.batch_size % world_size:
            raise ValueError(
                f"batch_size {self.batch_size} (the global batch) must be divisible by the "
                f"number of processes ({world_size})"
            )
        per = self.batch_size // world_size
        return self._positions(step * self.batch_size + rank * per, per)

    def _positions(self, pos: int, need: int) -> Tensor:
        """Positions ``[pos, pos + need)`` of the endless sequence of shuffled epochs, as fp32."""
        n_total = self.store.n_tokens
        parts = []
        while need > 0:
            epoch, offset = divmod(pos, n_total)
            _, starts = self._epoch_layout(epoch)
            w = int(np.searchsorted(starts, offset, side="right")) - 1
            buffer, perm = self._load_window(epoch, w)
            a = offset - int(starts[w])
            take = min(need, len(perm) - a)
            rows = buffer[perm[a : a + take]]  # fancy indexing copies out of the buffer
            del buffer  # so that loading the next window never holds two buffers
            parts.append(from_storage(rows, self.store.dtype, copy=False))
            pos, need = pos + take, need - take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def iterate(self, start_step: int) -> Iterator[Tensor]:
        step = start_step
        while True:
            yield self.batch(step)
            step += 1

    def sample(self, n: int) -> Tensor:
        """``min(n, N)`` distinct rows drawn uniformly from the whole store, fixed by ``seed``."""
        n = min(n, self.store.n_tokens)
        rng = np.random.default_rng([self.seed, 1_000_003])
        return self.store.gather(rng.choice(self.store.n_tokens, size=n, replace=False))
