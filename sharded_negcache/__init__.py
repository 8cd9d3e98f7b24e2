"""sharded_negcache: the negative cache of Lindgren et al. (NeurIPS 2021), sharded row-wise across ranks."""
from .exchange import BatchRejected, CollectiveFailed
from .handler import DocumentNetworkFailed, NonFiniteLoss, NonFiniteRows, ShardedCacheLossHandler, StepResult
from .jagged import JaggedFieldSpec
from .specs import FieldSpec
from .store import CacheTooLarge

__all__ = [
    "FieldSpec", "JaggedFieldSpec", "ShardedCacheLossHandler", "StepResult",
    "BatchRejected", "CollectiveFailed", "NonFiniteRows", "NonFiniteLoss", "DocumentNetworkFailed", "CacheTooLarge",
]
__version__ = "0.1.0"
