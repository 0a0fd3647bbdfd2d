"""LLM(..., tensor_parallel_size=N, executor="ray"|"mpi") from a plain Python process: same greedy
tokens as tp=1 and transformers, same log-probabilities; two Ray nodes; the Cluster API."""

from __future__ import annotations


import pytest

from distrt import LLM, Cluster, SamplingParams
from tiny_models import assert_same_outputs, hf_greedy, load_hf_model, make_tiny_checkpoint

PROMPTS = [[5, 9, 3, 44, 17, 8, 100, 2, 61], list(range(3, 40)), [7] * 5]
SP = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ex")), "llama-gqa")


@pytest.fixture(scope="module")
def reference(ckpt: str) -> list:
    hf = load_hf_model(ckpt)
    want = [hf_greedy(hf, p, SP.max_tokens) for p in PROMPTS]  # type: ignore[arg-type]
    llm = LLM(ckpt, dtype="float32", device="cpu", max_model_len=128)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SP, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want  # tp=1 == transformers
    return outs




@pytest.fixture(scope="module")
def ray_local() -> object:
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_ray_tp2_matches_tp1(ckpt: str, reference: list, ray_local: object) -> None:
    with LLM(ckpt, dtype="float32", device="cpu", max_model_len=128, tensor_parallel_size=2, executor="ray") as llm:
        assert_same_outputs(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SP, use_tqdm=False), reference)
        llm.engine.check_integrity()
        info = llm._executor.describe_workers()  # type: ignore[attr-defined]
        assert [w["rank"] for w in info] == [0, 1] and {w["tp_all_reduce"] for w in info} == {"TorchDistComm"}


@pytest.mark.parametrize("tp", [2, 4])
def test_mpi_tp_matches_tp1(ckpt: str, reference: list, tp: int) -> None:
    with LLM(ckpt, dtype="float32", device="cpu", max_model_len=128, tensor_parallel_size=tp, executor="mpi") as llm:
        pids = llm._executor.worker_pids()  # type: ignore[attr-defined]
        assert len(pids) == tp
        info = llm._executor.describe_workers()  # type: ignore[attr-defined]
        assert [w["pid"] for w in info] == pids and all(w["device"] == "cpu" for w in info)
        assert {w["tp_all_reduce"] for w in info} == {"MpiComm"}  # CPU: no IPC kernel
        assert_same_outputs(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SP, use_tqdm=False), reference)
    from proc_utils import wait_gone

    assert wait_gone(pids, 20), "MPI workers left behind after shutdown"


def test_ray_two_nodes_workers_on_different_nodes(ckpt: str, reference: list) -> None:
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster as RayTestCluster

    if ray.is_initialized():
        ray.shutdown()
    rc = RayTestCluster(initialize_head=True, head_node_args={"num_cpus": 1})
    rc.add_node(num_cpus=1)
    rc.wait_for_nodes()
    try:
        with Cluster.ray(address=rc.address, placement_strategy="STRICT_SPREAD") as cluster:
            assert len([n for n in cluster.nodes() if n.alive]) == 2
            llm = LLM(ckpt, dtype="float32", device="cpu", max_model_len=128, tensor_parallel_size=2, cluster=cluster)
            nodes = llm._executor.worker_nodes()  # type: ignore[attr-defined]
            assert len(set(nodes)) == 2, nodes
            assert_same_outputs(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SP, use_tqdm=False), reference)
    finally:
        ray.shutdown()
        rc.shutdown()


def test_cluster_validation() -> None:
    with pytest.raises(ValueError, match="backend"):
        Cluster("slurm")
    with pytest.raises(ValueError, match="placement_strategy"):
        Cluster("mpi", placement_strategy="ANYWHERE")
    assert Cluster.mpi().nodes()[0].cpus >= 1


def test_bad_tp_split_is_a_clear_error(tmp_path: object) -> None:
    path = make_tiny_checkpoint(str(tmp_path), "llama-mha")  # 3 heads
    with pytest.raises(ValueError, match="not divisible by tensor_parallel_size"):
        LLM(path, dtype="float32", device="cpu", max_model_len=64, tensor_parallel_size=2, executor="mpi")
