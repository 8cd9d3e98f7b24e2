"""Adapters to training frameworks (each an optional extra; importing this package imports none of them).

- ``sharded_negcache.integrations.sentence_transformers``: a sentence-transformers loss and trainer callback
  (``pip install 'sharded_negcache[sentence-transformers]'``).
"""
