"""Activation files, the sharded on-disk store and streaming loaders."""
