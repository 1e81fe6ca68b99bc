"""Generation on token ids: the `Engine` over a paged KV/CCA cache with prefix caching.

    sequence  Request, Sequence, Completion, TokenEvent
    blocks    BlockPool: block ids, reference counts, the hash-chain prefix cache, LRU eviction
    cache     PagedCache: the pools, CCA state slots and snapshots, a sequence's block tables
    runner    ForwardBatch: one forward call's metadata, the object the model takes as ``cache``
    engine    Engine: admission, chunked prefill within a token budget, decode, preemption
"""

from zaya.engine.cache import CacheFullError, PagedCache, parse_memory
from zaya.engine.engine import Engine, decode_threads
from zaya.engine.sequence import Completion, Request, Sequence, TokenEvent
from zaya.engine.speculative import SpecStats

__all__ = ["CacheFullError", "Completion", "Engine", "PagedCache", "Request", "Sequence", "SpecStats", "TokenEvent",
           "decode_threads", "parse_memory"]
