"""Moved to ``common.hooks`` (the one hook layer); kept while callers move."""

from common.hooks import *  # noqa: F403
from common.hooks import block_list, list_sites, resolve_site, site_name_error, tokens_from  # noqa: F401
