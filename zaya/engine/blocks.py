"""Block ids, reference counts and the prefix cache of one pool of KV blocks.

A block holds ``block_size`` consecutive positions of one sequence. Blocks in use have a reference
count (a prompt block shared by n samples, or by two requests with the same prefix, counts each
user). A full block is named by a hash chain over the token ids from the start of the sequence:
``hash(parent hash, its tokens)``, the first parent being the pool's identity (the model, its dtype
and quantization), so equal names mean equal contents for this model. When its last user lets go
a named block stays cached, unreferenced, in least-recently-used order, until an allocation needs
it back; an unnamed block (a partial one) goes straight back to the free list. Block 0 is the
null block: never handed out, it is where padding slots point.

The structure follows nano-vllm's BlockManager and vLLM's automatic prefix caching (a
hash-to-block map, token ids kept as a collision guard, freed blocks evicted deepest first).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from typing import Sequence

NULL_BLOCK = 0


def seed_hash(identity: str) -> bytes:
    """The root of every hash chain: what makes two pools' names comparable (or not)."""
    return hashlib.blake2b(identity.encode(), digest_size=16).digest()


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    """Ids 1 .. num_blocks-1, each free, in use (ref > 0) or cached (named, ref 0)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError("a block pool needs the null block and at least one more")
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.ref[NULL_BLOCK] = 1  # pinned: never allocated, never evicted
        self.name: list[bytes | None] = [None] * num_blocks
        self.tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.by_name: dict[bytes, int] = {}
        self.free: deque[int] = deque(range(1, num_blocks))
        self.cached: OrderedDict[int, None] = OrderedDict()  # named and unreferenced, oldest first
        self.evictions = 0

    # -- counts ---------------------------------------------------------------------------------
    @property
    def available(self) -> int:
        """Blocks an allocation can take now (free, or cached and unreferenced)."""
        return len(self.free) + len(self.cached)

    @property
    def used(self) -> int:
        return self.num_blocks - 1 - self.available

    # -- lifetime -------------------------------------------------------------------------------
    def allocate(self) -> int:
        """A block for new writes, ref 1. Evicts the least recently used cached block when no
        block is free; raises IndexError when every block is in use."""
        if self.free:
            block = self.free.popleft()
        elif self.cached:
            block, _ = self.cached.popitem(last=False)
            self._forget(block)
            self.evictions += 1
        else:
            raise IndexError("every block is in use")
        self.ref[block] = 1
        return block

    def acquire(self, block: int) -> None:
        """One more user of a block in use or cached (a prefix hit, a fork)."""
        if self.ref[block] == 0:
            del self.cached[block]
        self.ref[block] += 1

    def release(self, block: int) -> None:
        if block == NULL_BLOCK:
            return
        if self.ref[block] <= 0:
            raise RuntimeError(f"block {block} released more often than acquired")
        self.ref[block] -= 1
        if self.ref[block] == 0:
            if self.name[block] is None:
                self.free.appendleft(block)  # reused first: the touched pages stay few
            else:
                self.cached[block] = None

    # -- names ----------------------------------------------------------------------------------
    def lookup(self, name: bytes, tokens: Sequence[int]) -> int | None:
        """The block named ``name`` holding exactly ``tokens``, or None."""
        block = self.by_name.get(name)
        if block is None or self.tokens[block] != tuple(tokens):
            return None
        return block

    def register(self, block: int, name: bytes, tokens: Sequence[int]) -> bool:
        """Name a full block. False (and the block stays unnamed) when another block already
        has the name: two sequences computed the same block, the first one stays the cached one."""
        if name in self.by_name:
            return False
        self.name[block], self.tokens[block] = name, tuple(tokens)
        self.by_name[name] = block
        return True

    def _forget(self, block: int) -> None:
        name = self.name[block]
        if name is not None and self.by_name.get(name) == block:
            del self.by_name[name]
        self.name[block] = self.tokens[block] = None
