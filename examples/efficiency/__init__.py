"""Efficiency study: sentence-transformers towers with and without the negative cache (see study.py)."""
