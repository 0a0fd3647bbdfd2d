import pytest

from distrt.engine.kv_allocator import KVAllocator
from distrt.messages import RequestId

A, B, C = RequestId("a"), RequestId("b"), RequestId("c")


def test_allocate_exact_ids_and_free_order() -> None:
    al = KVAllocator(num_blocks=6, block_size=4)
    assert al.allocate(A, 5) == [0, 1]  # 5 tokens -> 2 blocks
    assert al.allocate(B, 4) == [2]
    assert al.allocate(A, 8) == []  # still 2 blocks
    assert al.allocate(A, 9) == [3]
    assert al.block_table(A) == [0, 1, 3]
    assert al.num_free_blocks == 2
    assert al.free(A) == 3
    # FIFO: blocks freed go to the back, so 4, 5 come first, then 0, 1, 3
    assert al.allocate(C, 16) == [4, 5, 0, 1]
    assert al.num_free_blocks == 1
    al.check_integrity()


def test_allocate_all_or_nothing() -> None:
    al = KVAllocator(num_blocks=3, block_size=2)
    assert al.allocate(A, 4) == [0, 1]
    assert al.allocate(B, 4) is None  # needs 2, only 1 free: takes nothing
    assert al.block_table(B) == []
    assert al.num_free_blocks == 1
    assert al.allocate(A, 7) is None  # needs 2 more
    assert al.block_table(A) == [0, 1]
    al.check_integrity()


def test_integrity_detects_leak_and_double_ownership() -> None:
    al = KVAllocator(num_blocks=4, block_size=2)
    al.allocate(A, 4)
    al._free.popleft()  # simulate a leak
    with pytest.raises(AssertionError, match="leaked"):
        al.check_integrity()
    al2 = KVAllocator(num_blocks=4, block_size=2)
    al2.allocate(A, 2)
    al2._tables[B] = list(al2._tables[A])
    with pytest.raises(AssertionError, match="owned twice"):
        al2.check_integrity()


def test_usage_and_bad_size() -> None:
    al = KVAllocator(num_blocks=4, block_size=2)
    al.allocate(A, 3)
    assert al.usage == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one block"):
        KVAllocator(num_blocks=0, block_size=2)
