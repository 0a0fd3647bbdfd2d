"""`distrt` command line: generate (more subcommands register themselves in SUBCOMMANDS)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from distrt.config import KV_CACHE_DTYPES


class _BadList(argparse.ArgumentTypeError, ValueError):  # argparse shows its text; config files catch ValueError
    pass


def _int_list(text: str) -> list[int]:
    """'1,2,4' (a flag) or '[1, 2, 4]' (a YAML list from --config, passed through str)."""
    try:
        return [int(x) for x in text.strip().strip("[]").split(",") if x.strip()]
    except ValueError:
        raise _BadList(f"expected comma-separated integers, got {text!r}") from None


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="default",
                   help="Hugging Face checkpoint directory, GGUF file, or 'default' (embedded SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-memory", type=float, default=0.9,
                   help="fraction (<= 1) of free device memory for the KV cache, or bytes (> 1)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="auto: the model dtype; fp8 (= fp8_e4m3): half the KV bytes, twice the blocks")
    g.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1)
    g.add_argument("--pp", "--pipeline-parallel-size", dest="pp", type=int, default=1)
    g.add_argument("--ep", "--expert-parallel-size", dest="ep", type=int, default=1)
    g.add_argument("--pipeline-micro-batches", type=int, default=None,
                   help="pp > 1: micro-batches in flight (default pp)")
    g.add_argument("--executor", default="auto", help="auto | local | ray | mpi")
    g.add_argument("--cuda-graph-sizes", type=_int_list, default=None, metavar="N,N,...",
                   help="decode batch sizes to capture as CUDA graphs (max-num-seqs is always added); "
                        "default 1,2,4,8, every 16 to 256, every 32 above")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                   help="build each step only after the previous one's tokens are back (pp == 1)")
    g.add_argument("--admission", default="greedy", choices=["greedy", "lookahead"],
                   help="greedy: admit when the prompt fits now, preempt when the KV pool runs out; lookahead: "
                        "admit only when the pool's projected peak fits, paced so equal requests age apart "
                        "(for requests with max_tokens set: offline batches, benchmarks)")


def engine_kwargs(a: argparse.Namespace) -> dict:
    return dict(dtype=a.dtype, device=a.device, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                block_size=a.block_size, kv_cache_memory=a.kv_cache_memory, tensor_parallel_size=a.tp,
                pipeline_parallel_size=a.pp, expert_parallel_size=a.ep, executor=a.executor, seed=a.seed,
                async_scheduling=getattr(a, "async_scheduling", True),
                pipeline_micro_batches=getattr(a, "pipeline_micro_batches", None),
                kv_cache_dtype=getattr(a, "kv_cache_dtype", "auto"), admission=getattr(a, "admission", "greedy"),
                cuda_graph_sizes=getattr(a, "cuda_graph_sizes", None))


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for one prompt and print it with tokens/s")
    _add_engine_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw text prompt (completion)")
    src.add_argument("--chat", help="a user message, wrapped in the model's chat template")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=-1)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--n", type=int, default=1)
    s.add_argument("--stop", action="append", default=None)
    s.add_argument("--ignore-eos", action="store_true")
    s.set_defaults(func=_run_generate)


def _run_generate(a: argparse.Namespace) -> int:
    from distrt import LLM, SamplingParams

    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            min_p=a.min_p, n=a.n, stop=a.stop, ignore_eos=a.ignore_eos,
                            seed=a.seed if a.temperature > 0 else None)
    with LLM(a.model, **engine_kwargs(a)) as llm:
        t0 = time.perf_counter()
        if a.chat is not None:
            out = llm.chat([{"role": "user", "content": a.chat}], params, use_tqdm=False)[0]
        else:
            out = llm.generate(a.prompt, params, use_tqdm=False)[0]
        dt = time.perf_counter() - t0
    ntok = sum(len(o.token_ids) for o in out.outputs)
    for o in out.outputs:
        if len(out.outputs) > 1:
            print(f"--- sample {o.index} ---")
        print(o.text)
    print(f"\n[{ntok} tokens in {dt:.2f}s: {ntok / dt:.1f} tokens/s; prompt {len(out.prompt_token_ids)} tokens; "
          f"finish: {', '.join(str(o.finish_reason) for o in out.outputs)}]", file=sys.stderr)
    return 0


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    from distrt.server.cli_serve import add_serve_parser

    add_serve_parser(sub)


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    from distrt.bench.offline import add_offline_subcommands
    from distrt.server.cli_serve import add_bench_serve_subcommand

    bench = sub.add_parser("bench", help="benchmarks: throughput, latency, kernels, serve")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    add_offline_subcommands(bench_sub)
    k = bench_sub.add_parser("kernels", help="Triton kernels vs the measured copy bandwidth / GEMM rate (GPU)")
    k.add_argument("--quick", action="store_true")
    k.add_argument("--tune", action="store_true")
    k.add_argument("--kv-dtype", choices=["auto", "fp8"], default="auto",
                   help="fp8: also time decode attention over an fp8 (e4m3) KV cache")
    k.add_argument("--tune-fp8", action="store_true", help="sweep the decode launch config over an fp8 cache")
    k.add_argument("--out", default=None)
    k.set_defaults(func=_run_bench_kernels)
    add_bench_serve_subcommand(bench_sub)


def _run_bench_kernels(a: argparse.Namespace) -> int:
    from distrt.bench.kernels import main as kernels_main

    kernels_main((["--quick"] if a.quick else []) + (["--tune"] if a.tune else []) + ["--kv-dtype", a.kv_dtype]
                 + (["--tune-fp8"] if a.tune_fp8 else []) + (["--out", a.out] if a.out else []))
    return 0


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_generate_parser, _serve_parser, _bench_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distrt", description="distrt: distributed LLM inference runtime")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    from distrt.config_file import install_config_option

    install_config_option(parser)  # --config FILE on generate and bench (serve has its own)
    return parser


def main(argv: list[str] | None = None) -> int:
    from distrt.executor.mpi_executor import is_launched_worker_rank, launched_worker_main

    if is_launched_worker_rank():  # under mpirun/srun, ranks 1..N-1 serve rank 0's engine
        launched_worker_main()
        return 0
    args = build_parser().parse_args(argv)
    try:
        from distrt.config_file import apply_config_file

        args = apply_config_file(args)  # fills what the command line left unset: --config, then defaults
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"distrt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
