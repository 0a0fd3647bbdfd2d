"""The Ray executor widens each GPU actor's CUDA_VISIBLE_DEVICES so the IPC all-reduce can map its
TP peers' buffers: own GPU first (cuda:0 stays the one Ray assigned), then its node's other workers."""

from __future__ import annotations

from distrt.executor.ray_executor import widened_visibility


def test_same_node_workers_see_each_other_own_gpu_first() -> None:
    infos = [("n1", ["2"], False), ("n1", ["0"], False), ("n1", ["3"], False), ("n1", ["1"], False)]
    assert widened_visibility(infos) == [["2", "0", "3", "1"], ["0", "2", "3", "1"], ["3", "2", "0", "1"],
                                         ["1", "2", "0", "3"]]


def test_other_nodes_are_not_added() -> None:
    infos = [("a", ["0"], False), ("b", ["0"], False), ("a", ["1"], False)]
    assert widened_visibility(infos) == [["0", "1"], ["0"], ["1", "0"]]


def test_a_worker_with_cuda_started_keeps_what_it_sees() -> None:
    infos = [("a", ["0"], True), ("a", ["1"], False)]
    assert widened_visibility(infos) == [["0"], ["1", "0"]]
