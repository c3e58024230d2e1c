"""Models loaded offline or by hub name (``load_model``) and their named hook sites."""

from common.hooks import Site, list_sites, resolve_site, tokens_from
from common.models.loading import BUILTIN_MODELS, LoadedModel, load_model

__all__ = [
    "BUILTIN_MODELS",
    "LoadedModel",
    "Site",
    "list_sites",
    "load_model",
    "resolve_site",
    "tokens_from",
]
