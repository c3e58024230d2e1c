"""Evaluations: one entry point (``common.evals.evaluate``) writing one metrics dict per SAE."""
