"""Stage times are parsed from a timestamped `dvc repro` log and grouped by paper folder."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "stage_times.py"
spec = importlib.util.spec_from_file_location("stage_times", SCRIPT)
stage_times = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage_times)

LOG = """100 Running stage 'toy_data':
103 > python -m common.toy
110 Running stage 'paper_07_topk':
150 Running stage 'claims@07_topk':
152 Running stage 'compare_lm':
160 Use `dvc push` to send your updates to remote storage.
"""


def test_times_and_groups():
    times = stage_times.stage_times(LOG.splitlines())
    assert times == [("toy_data", 10), ("paper_07_topk", 40), ("claims@07_topk", 2),
                     ("compare_lm", 8)]  # fmt: skip
    assert stage_times.paper_of("claims@07_topk") == "07_topk"
    assert stage_times.paper_of("train_lm@topk") == "00_compare"
    assert stage_times.paper_of("extract_lm@train") == "shared"
    assert stage_times.paper_of("train_diffusion") == "shared"
    text = stage_times.markdown(times, "test box")
    assert "**Whole repository: 60 s (1.0 min).**" in text
    assert "| [07_topk](#07_topk) | 42 |" in text and "| [00_compare](#00_compare) | 8 |" in text
    assert "| [shared](#shared) | 10 |" in text
