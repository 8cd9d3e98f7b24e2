"""sharded_negcache: the negative cache of Lindgren et al. (NeurIPS 2021), sharded row-wise across ranks."""
from .exchange import BatchRejected, CollectiveFailed
from .handler import NonFiniteRows, ShardedCacheLossHandler, StepResult
from .jagged import JaggedFieldSpec
from .specs import FieldSpec
from .store import CacheTooLarge

__all__ = [
    "FieldSpec", "JaggedFieldSpec", "ShardedCacheLossHandler", "StepResult",
    "BatchRejected", "CollectiveFailed", "NonFiniteRows", "CacheTooLarge",
]
__version__ = "0.1.0"
