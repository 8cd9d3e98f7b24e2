"""Runnable examples of sharded_negcache (see examples/README.md)."""
