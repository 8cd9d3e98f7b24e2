"""sharded_negcache: the negative cache of Lindgren et al. (NeurIPS 2021), sharded row-wise across ranks."""
from .exchange import BatchRejected
from .handler import ShardedCacheLossHandler, StepResult
from .specs import FieldSpec

__all__ = ["FieldSpec", "ShardedCacheLossHandler", "StepResult", "BatchRejected"]
__version__ = "0.1.0"
