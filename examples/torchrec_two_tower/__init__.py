"""A TorchRec two-tower model (KJT, EBC, row-wise DMP) trained with the sharded negative cache."""
