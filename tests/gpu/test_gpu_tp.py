"""2 GPUs: tp=2 over NCCL (cupy) under Ray and under MPI matches transformers teacher-forced (fp32,
so the 99% bar measures the parallel path, not bf16 rounding); the two-node Ray simulation with NCCL
forced onto sockets still matches."""

from __future__ import annotations

import os

import pytest
import torch

from distrt import LLM, Cluster, SamplingParams
from gpu_checks import make_llama3_shaped, prompts, teacher_forced

pytestmark = pytest.mark.gpu


def _two_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object]:
    _two_gpus()
    from transformers import AutoModelForCausalLM

    ckpt = make_llama3_shaped(str(tmp_path_factory.mktemp("tp")))
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to("cuda:0").eval()
    return ckpt, hf


SP = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)


def _check(llm: LLM, hf: object) -> dict:
    ps = prompts(32000)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], SP, use_tqdm=False)
    m = teacher_forced(hf, ps, [o.outputs[0].token_ids for o in outs])
    print(m)
    assert m["top1_agreement"] >= 0.99, m
    return m


def _check_ipc(llm: LLM) -> None:
    """Both TP ranks took the IPC one-shot all-reduce (NVLink peers) and no kernel gave up waiting."""
    info = llm._executor.describe_workers()
    print(info)
    assert [w["tp_all_reduce"] for w in info] == ["ipc", "ipc"], info
    assert [w["ipc_error"] for w in info] == [0, 0], info


def test_tp2_mpi_nccl(setup: tuple) -> None:
    ckpt, hf = setup
    with LLM(ckpt, dtype="float32", device="cuda", max_model_len=1024, tensor_parallel_size=2,
             executor="mpi", kv_cache_memory=0.3) as llm:
        _check(llm, hf)
        _check_ipc(llm)


def test_tp2_ray_nccl(setup: tuple) -> None:
    ray = pytest.importorskip("ray")
    ckpt, hf = setup
    ray.init(address="local", num_gpus=2, num_cpus=4, include_dashboard=False)
    try:
        with LLM(ckpt, dtype="float32", device="cuda", max_model_len=1024, tensor_parallel_size=2,
                 executor="ray", kv_cache_memory=0.3) as llm:
            _check(llm, hf)
            _check_ipc(llm)  # the Ray executor widened the actors' CUDA_VISIBLE_DEVICES
    finally:
        ray.shutdown()


def test_tp2_two_ray_nodes_nccl_sockets(setup: tuple) -> None:
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster as RayTestCluster

    ckpt, hf = setup
    saved = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE")}
    os.environ.update(NCCL_P2P_DISABLE="1", NCCL_SHM_DISABLE="1")
    rc = RayTestCluster()
    try:
        for gpu in ("0", "1"):  # each simulated node's raylet sees one GPU
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            rc.add_node(num_cpus=2, num_gpus=1)
        rc.wait_for_nodes()
        for k, v in saved.items():
            if k == "CUDA_VISIBLE_DEVICES":
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        with Cluster.ray(address=rc.address, placement_strategy="STRICT_SPREAD") as cluster:
            llm = LLM(ckpt, dtype="float32", device="cuda", max_model_len=1024, tensor_parallel_size=2,
                      cluster=cluster, kv_cache_memory=0.3)
            assert len(set(llm._executor.worker_nodes())) == 2  # type: ignore[attr-defined]
            _check(llm, hf)
    finally:
        ray.shutdown()
        rc.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
