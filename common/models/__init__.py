"""Models loaded offline or by hub name (``load_model``) and their named hook sites."""

from common.models.loading import BUILTIN_MODELS, LoadedModel, load_model
from common.models.sites import ResolvedSite, list_sites, resolve_site, tokens_from

__all__ = [
    "BUILTIN_MODELS",
    "LoadedModel",
    "ResolvedSite",
    "list_sites",
    "load_model",
    "resolve_site",
    "tokens_from",
]
