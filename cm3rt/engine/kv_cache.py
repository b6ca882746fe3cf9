"""Paged KV cache: host-side block accounting (pool, prefix cache, copy-on-write) and the
device tensors it describes.

Every stream of every request owns a *block table*: the ids of the fixed-size blocks that
hold its keys/values, in order. The :class:`BlockPool` hands blocks out and takes them back:

* reference counts: a block may be shared by several streams (a prefix-cache hit, or the
  ``n`` samples of one prompt after :meth:`KVCacheManager.fork`);
* prefix caching: a *full* block, once computed, is registered under a chained hash of all
  tokens up to and including it (plus content keys, e.g. an image digest, of the spans it
  overlaps, so two images that map to equal placeholder ids never collide). A later stream
  with the same prefix reuses it instead of recomputing it;
* free list in LRU order: a released block that holds a registered prefix stays findable
  until its slot is needed again; blocks with nothing worth keeping are reused first, then
  cached blocks from the least recently released on;
* copy-on-write: a stream about to write into a partial block that another stream shares
  gets a private copy first (the copy is executed on the device before the step's forward).

The accounting is plain Python over small lists: it runs once per scheduled stream per
step, never per token of the vocabulary.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

_ROOT_HASH = b"\0" * 16


def chain_hash(parent: bytes | None, tokens, content_keys: tuple = ()) -> bytes:
    """Hash of one full block: the parent block's hash, its token ids and content keys.

    Chaining makes the hash identify the whole prefix (and so the positions), not just the
    block's own tokens.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or _ROOT_HASH)
    h.update(array("q", tokens).tobytes())
    for offset, key in content_keys:
        h.update(b"|%d|" % offset)
        h.update(key)
    return h.digest()


@dataclass
class KVSeq:
    """The cache state of one token stream.

    Attributes:
        tokens: all token ids of the stream (prompt, then generated).
        content_keys: ``(start, end, key)`` spans: tokens ``start:end`` stand for content
            identified by ``key`` (bytes), e.g. an image digest. Part of the prefix hash.
        num_computed: leading tokens whose keys/values are in the cache.
        blocks: block table (block ids, in order).
        block_hashes: chained hashes of the leading full, computed blocks.
    """

    tokens: list[int]
    content_keys: list[tuple[int, int, bytes]] = field(default_factory=list)
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)

    def keys_in(self, start: int, end: int) -> tuple:
        """Content keys overlapping tokens ``start:end``, offsets relative to the span."""
        return tuple(
            (s - start, k) for s, e, k in self.content_keys if s < end and e > start
        )


@dataclass
class CacheStats:
    """Counters for tests and logs (cumulative since the pool was made)."""

    prefix_queried_blocks: int = 0
    prefix_hit_blocks: int = 0
    forked_blocks: int = 0
    cow_copies: int = 0
    evictions: int = 0
    allocations: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        q = self.prefix_queried_blocks
        return self.prefix_hit_blocks / q if q else 0.0


class BlockPool:
    """Reference-counted blocks, a prefix-hash table and the LRU free list."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"BlockPool: num_blocks must be an int >= 1, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"BlockPool: block_size must be an int >= 1, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        # Free blocks holding nothing reusable: handed out first.
        self._free_plain: deque[int] = deque(range(num_blocks))
        # Free blocks still holding a registered prefix, least recently released first.
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self.stats = CacheStats()

    @property
    def num_free(self) -> int:
        """Blocks that an allocation can take (cached ones are evicted on demand)."""
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_shared(self) -> int:
        """Blocks currently referenced by more than one stream."""
        return sum(1 for r in self.ref if r > 1)

    def allocate(self) -> int:
        """A fresh block with reference count 1 (evicts the LRU cached block if needed)."""
        if self._free_plain:
            bid = self._free_plain.popleft()
        elif self._free_cached:
            bid, _ = self._free_cached.popitem(last=False)
            h = self.hash_of[bid]
            if h is not None and self.cached.get(h) == bid:
                del self.cached[h]
            self.hash_of[bid] = None
            self.stats.evictions += 1
        else:
            raise RuntimeError("BlockPool.allocate: no free block (the scheduler checks first)")
        assert self.ref[bid] == 0
        self.ref[bid] = 1
        self.stats.allocations += 1
        return bid

    def lookup(self, h: bytes) -> int | None:
        """The block registered under hash ``h``, or None."""
        return self.cached.get(h) if self.enable_prefix_caching else None

    def acquire(self, bid: int) -> None:
        """Add a reference to block ``bid`` (a prefix hit or a fork)."""
        if self.ref[bid] == 0:
            # A hit on a released block takes it off the free list.
            del self._free_cached[bid]
        self.ref[bid] += 1

    def release(self, bid: int) -> None:
        """Drop a reference; at zero the block goes to the free list."""
        r = self.ref[bid]
        if r <= 0:
            raise RuntimeError(f"BlockPool.release: block {bid} is not in use")
        self.ref[bid] = r - 1
        if r == 1:
            if self.hash_of[bid] is not None:
                self._free_cached[bid] = None  # most recently used end
            else:
                self._free_plain.append(bid)

    def register(self, bid: int, h: bytes) -> None:
        """Make the full block ``bid`` findable under ``h`` (first registration wins)."""
        if not self.enable_prefix_caching or self.hash_of[bid] is not None:
            return
        if h not in self.cached:
            self.cached[h] = bid
            self.hash_of[bid] = h


class KVCacheManager:
    """Block tables of streams over one :class:`BlockPool`."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.block_size = pool.block_size

    # --- capacity ---------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _prefix_hits(self, seq: KVSeq) -> list[tuple[int, bytes]]:
        """Leading cached full blocks of ``seq.tokens`` as (block id, hash).

        The last token is never served from the cache: its logits are needed.
        """
        if not self.pool.enable_prefix_caching:
            return []
        bs = self.block_size
        hits: list[tuple[int, bytes]] = []
        parent = None
        for i in range((len(seq.tokens) - 1) // bs):
            lo = i * bs
            h = chain_hash(parent, seq.tokens[lo:lo + bs], seq.keys_in(lo, lo + bs))
            bid = self.pool.lookup(h)
            if bid is None:
                break
            hits.append((bid, h))
            parent = h
        return hits

    def admission_cost(self, seqs: list[KVSeq], extra_blocks: int = 0) -> int:
        """Free blocks that admitting ``seqs`` (fresh, no blocks yet) would consume in total:
        their whole token lists, less prefix hits on blocks already in use."""
        cost = extra_blocks
        taken: set[int] = set()
        for seq in seqs:
            hits = self._prefix_hits(seq)
            cost += self.blocks_for(len(seq.tokens)) - len(hits)
            for bid, _ in hits:
                if self.pool.ref[bid] == 0 and bid not in taken:
                    cost += 1  # a released cached block leaves the free list
                    taken.add(bid)
        return cost

    def blocks_needed(self, seq: KVSeq, num_new: int) -> int:
        """Free blocks needed to write tokens ``num_computed : num_computed + num_new``."""
        start = seq.num_computed
        need = self.blocks_for(start + num_new) - len(seq.blocks)
        need = max(need, 0)
        bi = start // self.block_size
        if start % self.block_size and bi < len(seq.blocks) and self.pool.ref[seq.blocks[bi]] > 1:
            need += 1  # copy-on-write of the shared partial block
        return need

    # --- mutations ----------------------------------------------------------------------
    def admit(self, seq: KVSeq) -> int:
        """Attach prefix-cache hits to a stream with no blocks; returns the cached tokens."""
        if seq.blocks:
            raise RuntimeError("KVCacheManager.admit: stream already holds blocks")
        hits = self._prefix_hits(seq)
        nfull = (len(seq.tokens) - 1) // self.block_size
        self.pool.stats.prefix_queried_blocks += nfull
        self.pool.stats.prefix_hit_blocks += len(hits)
        for bid, _ in hits:
            self.pool.acquire(bid)
        seq.blocks = [bid for bid, _ in hits]
        seq.block_hashes = [h for _, h in hits]
        seq.num_computed = len(hits) * self.block_size
        return seq.num_computed

    def reserve(self, seq: KVSeq, num_new: int) -> list[tuple[int, int]]:
        """Make tokens ``num_computed : num_computed + num_new`` writable; returns the
        (src, dst) block copies that copy-on-write needs before the write."""
        copies: list[tuple[int, int]] = []
        start = seq.num_computed
        bi = start // self.block_size
        if start % self.block_size and bi < len(seq.blocks):
            old = seq.blocks[bi]
            if self.pool.ref[old] > 1:
                new = self.pool.allocate()
                copies.append((old, new))
                self.pool.release(old)
                seq.blocks[bi] = new
                self.pool.stats.cow_copies += 1
        while len(seq.blocks) < self.blocks_for(start + num_new):
            seq.blocks.append(self.pool.allocate())
        return copies

    def commit(self, seq: KVSeq, num_new: int) -> None:
        """Record that ``num_new`` more tokens were computed; register newly full blocks."""
        seq.num_computed += num_new
        if seq.num_computed > len(seq.tokens):
            raise RuntimeError("KVCacheManager.commit: computed past the stream's tokens")
        bs = self.block_size
        nfull = seq.num_computed // bs
        while len(seq.block_hashes) < nfull:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            lo = i * bs
            h = chain_hash(parent, seq.tokens[lo:lo + bs], seq.keys_in(lo, lo + bs))
            seq.block_hashes.append(h)
            self.pool.register(seq.blocks[i], h)

    def fork(self, parent: KVSeq, child: KVSeq) -> None:
        """Let ``child`` share all of ``parent``'s blocks (tokens must match so far)."""
        if child.blocks:
            raise RuntimeError("KVCacheManager.fork: child already holds blocks")
        for bid in parent.blocks:
            self.pool.acquire(bid)
        self.pool.stats.forked_blocks += len(parent.blocks)
        child.blocks = list(parent.blocks)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed = parent.num_computed

    def free(self, seq: KVSeq) -> None:
        """Release every block of ``seq`` (last block first, so prefixes stay cached
        longest) and reset its computed state."""
        for bid in reversed(seq.blocks):
            self.pool.release(bid)
        seq.blocks = []
        seq.block_hashes = []
        seq.num_computed = 0


# --- device side ------------------------------------------------------------------------


def available_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device``: CUDA free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def num_blocks_for_budget(
    bytes_per_block: int,
    device: torch.device,
    *,
    budget_bytes: int | None = None,
    fraction: float | None = None,
    max_useful_blocks: int | None = None,
) -> int:
    """Blocks that fit a memory budget: ``budget_bytes``, else ``fraction`` of the free
    memory of ``device``; capped at ``max_useful_blocks`` (more could never be used)."""
    if budget_bytes is not None and fraction is not None:
        raise ValueError("give either kv_cache_bytes or kv_cache_fraction, not both")
    if budget_bytes is not None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be a positive int, got {budget_bytes!r}")
        budget = budget_bytes
    else:
        frac = 0.5 if fraction is None else fraction
        if not isinstance(frac, (int, float)) or not (0.0 < frac <= 1.0):
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {frac!r}")
        budget = int(available_memory_bytes(device) * frac)
    n = budget // bytes_per_block
    if max_useful_blocks is not None:
        n = min(n, max_useful_blocks)
    if n < 1:
        raise ValueError(
            f"KV cache budget of {budget} bytes holds no block ({bytes_per_block} bytes each); "
            "raise kv_cache_bytes / kv_cache_fraction"
        )
    return int(n)


class PagedKVCache:
    """The per-layer (k_cache, v_cache) tensors ``[num_blocks, block_size, Hkv, D]``."""

    def __init__(self, model, num_blocks: int, block_size: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = model.allocate_kv_cache(
            num_blocks, block_size
        )
        self.num_blocks = num_blocks
        self.block_size = block_size

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write)."""
        if not pairs:
            return
        device = self.layers[0][0].device
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long).to(device, non_blocking=True)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long).to(device, non_blocking=True)
        for k, v in self.layers:
            k.index_copy_(0, dst, k.index_select(0, src))
            v.index_copy_(0, dst, v.index_select(0, src))
