"""Thin shared SAE core."""
