"""Code search over the Python standard library: in-batch negatives vs the sharded negative cache."""
