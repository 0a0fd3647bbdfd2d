"""Global paged-KV block allocator, owned by the coordinator.

Every worker's KV pool is indexed by the same block ids; each worker stores its own heads and
layers inside a block. A request's block table maps its token positions to blocks:

    block_size = 4, request with 10 tokens, table [7, 2, 5]
    positions:  0 1 2 3 | 4 5 6 7 | 8 9 . .
    block:         7    |    2    |    5       slot(pos) = table[pos // 4] * 4 + pos % 4

Free blocks sit in a FIFO queue: allocation pops from the front, freeing appends at the back, both O(1).
"""

from __future__ import annotations

from collections import deque

from distrt.messages import BlockId, RequestId


class KVAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[BlockId] = deque(BlockId(i) for i in range(num_blocks))
        self._tables: dict[RequestId, list[BlockId]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, req_id: RequestId) -> list[BlockId]:
        return self._tables.get(req_id, [])

    def can_allocate(self, req_id: RequestId, num_tokens: int) -> bool:
        have = len(self._tables.get(req_id, ()))
        return self.blocks_needed(num_tokens) - have <= len(self._free)

    def allocate(self, req_id: RequestId, num_tokens: int) -> list[BlockId] | None:
        """Grow req's table to cover num_tokens; return the new blocks, or None (nothing taken) if short."""
        table = self._tables.get(req_id)
        need = -(-num_tokens // self.block_size) - (len(table) if table is not None else 0)
        if need > len(self._free):
            return None
        if table is None:
            table = self._tables[req_id] = []
        if need <= 0:  # the common decode step: the last block still has room
            return []
        pop = self._free.popleft
        new = [pop() for _ in range(need)]
        table.extend(new)
        return new

    def free(self, req_id: RequestId) -> int:
        table = self._tables.pop(req_id, [])
        self._free.extend(table)
        return len(table)

    def check_integrity(self) -> None:
        """Every block is either free or owned by exactly one request; raises AssertionError if not."""
        owned = [b for t in self._tables.values() for b in t]
        seen = set(owned)
        if len(seen) != len(owned):
            raise AssertionError("a KV block is owned twice")
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a KV block is in the free queue twice")
        if seen & free:
            raise AssertionError(f"blocks both owned and free: {sorted(seen & free)[:8]}")
        if len(seen) + len(free) != self.num_blocks:
            raise AssertionError(f"{self.num_blocks - len(seen) - len(free)} KV blocks leaked")
