"""Shared test settings: deterministic, single-threaded-friendly, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import torch  # noqa: E402

# Small toy models train faster on one thread, and the tests never oversubscribe a 2-core CI box.
torch.set_num_threads(1)
