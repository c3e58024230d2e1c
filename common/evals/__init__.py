"""Evaluations: one entry point, ``evaluate``, writing one metrics dict per SAE."""

from common.evals.evaluate import evaluate

__all__ = ["evaluate"]
