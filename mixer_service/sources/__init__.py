"""Sources the service serves: token sources (prepared, adopted in place, local or in object storage)
behind a bounded verified shard cache, and image sources. Nothing here imports the planner or scipy."""

from mixer_service.sources.cache import Shard, ShardCache
from mixer_service.sources.prepared import DocumentIndexError, PreparedSource
from mixer_service.sources.tokens import ShardedTokens
from mixer_service.sources.verify import DEFAULT_VERIFY, VerifyMode

__all__ = ["DEFAULT_VERIFY", "DocumentIndexError", "PreparedSource", "Shard", "ShardCache", "ShardedTokens",
           "VerifyMode"]
