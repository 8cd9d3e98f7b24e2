"""Drop-in API of the reference implementations (``negative_cache``), backed by the sharded engine.

Switch by changing the import root only::

    from sharded_negcache.compat import negative_cache, losses, handlers, retrieval_fns, filter_fns, util

See docs/migration.md for the deliberate differences from the references.
"""
from . import filter_fns, handlers, losses, negative_cache, retrieval_fns, util

__all__ = ["negative_cache", "losses", "handlers", "retrieval_fns", "filter_fns", "util"]
