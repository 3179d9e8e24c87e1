"""Which KV-cache blocks each sequence holds, and the cache of full blocks shared by prefix hash.

Plain bookkeeping over block ids, no tensors. A block is free, held by one or more sequences
(a reference count), or cached: full, unused, and findable by its hash until it is evicted,
least recently released first, when free blocks run out.

A full block's hash covers (adapter identity, parent block's hash, its token ids), so a hit
means the same tokens after the same prefix under the same adapter version. The identity is
the adapter's key (name, version and content digest) for every adapter kind, "" for the base
model: LoRA, DoRA, IA3 and bottleneck adapters change keys and values directly, prompt and
prefix tuning through their virtual tokens in front (written as negative ids, one per virtual
position). So a base row never reads an adapter's block, nor one adapter another's.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence

NULL_BLOCK = 0
"""Never held by a sequence: padding tokens write here and block tables are padded with it."""


class BlockError(RuntimeError):
    """The block bookkeeping broke (a bug): a block released more often than taken."""


def root_hash(identity: str) -> bytes:
    """The parent hash of a sequence's first block."""
    return hashlib.sha256(b"peftserve-kv\0" + identity.encode()).digest()


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of a full block of `tokens` after the block hashed `parent`."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


def block_hashes(identity: str, tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Chained hashes of the full blocks of `tokens` (a partial last block has none)."""
    hashes: list[bytes] = []
    parent = root_hash(identity)
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = chain_hash(parent, tokens[start : start + block_size])
        hashes.append(parent)
    return hashes


class BlockPool:
    def __init__(self, num_blocks: int, prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(1, num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # unused cached blocks, oldest release first

    @property
    def capacity(self) -> int:
        """Blocks sequences can hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def available(self) -> int:
        """Blocks a sequence can take now: free ones and cached ones no sequence holds."""
        return len(self._free) + len(self._cached)

    @property
    def used(self) -> int:
        """Blocks held by sequences."""
        return self.capacity - self.available

    def allocate(self) -> int | None:
        """A block for one sequence; evicts the least recently released cached block if none is free."""
        if self._free:
            block = self._free.popleft()
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
        else:
            return None
        self._refs[block] = 1
        return block

    def release(self, blocks: Sequence[int]) -> None:
        """A sequence gives its blocks back; its last blocks are the first evicted (the least shared)."""
        for block in reversed(blocks):
            if self._refs[block] <= 0 or block == NULL_BLOCK:
                raise BlockError(f"block {block} released more often than taken")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    def hits(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest run of these hashes from the start."""
        if not self.prefix_caching:
            return []
        blocks = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def cost(self, hashes: Sequence[bytes], blocks_needed: int) -> tuple[int, int]:
        """(blocks taken from `available`, tokens-worth of blocks hit) for a sequence of `blocks_needed`
        blocks whose full blocks hash to `hashes`: a hit on a held block costs nothing."""
        hit = self.hits(hashes)
        shared = sum(self._refs[b] > 0 for b in hit)
        return blocks_needed - shared, len(hit)

    def take(self, blocks: Sequence[int]) -> None:
        """A sequence starts sharing these cached blocks (from `hits`)."""
        for block in blocks:
            self._refs[block] += 1
            self._cached.pop(block, None)

    def register(self, block: int, block_hash: bytes) -> None:
        """A block became full: later sequences may share it. A duplicate of a cached block stays private."""
        if not self.prefix_caching or block_hash in self._by_hash or block in self._hash_of:
            return
        self._by_hash[block_hash] = block
        self._hash_of[block] = block_hash
