"""`llmesh bench gpu_check`: the GPU path checked on one device, in under 5 minutes on
an H100 (bench/gpu_check.sh runs it with the machine's own torch; docs/gpu.md).

  1. HF-exact: the engine's greedy tokens equal transformers' on the same device in
     float32, for the embedded tiny model and a random-weight 1B-class Llama
     (TinyLlama-1.1B's shape), several prompts batched in the engine, each alone in HF;
     and CUDA's sync debug mode counts no host synchronisation inside the layers.
  2. Live migration: two worker processes on the one device, a request moved mid-decode
     from one to the other; its tokens equal the same request left alone.
  3. Decode throughput of the 1B-class model at batch 1 / 32 / 128 (random weights), and
     that as a fraction of the memory-bandwidth roofline, the baseline:

         roofline tokens/s = batch / ((weight bytes + KV bytes read per step) / bandwidth)

     bandwidth = --hbm-gbps (default: an H100 SXM's 3350 GB/s); the bandwidth a big
     device copy reaches is measured too and its fraction printed beside.

Prints a table and, last, one JSON line; exits 1 when any tokens are not exact (or the
migration did not move the request). `--device cpu --shape small` runs it all on a CPU
(how the tests check it).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time

H100_SXM_HBM_GBPS = 3350.0


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmesh bench gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument(
        "--shape", choices=["1b", "small"], default="1b", help="the random model's shape"
    )
    p.add_argument("--batches", default="1,32,128", help="decode batch sizes, comma-separated")
    p.add_argument(
        "--prompt-len", type=int, default=256, help="prompt tokens per request (throughput)"
    )
    p.add_argument("--decode-steps", type=int, default=64, help="timed decode steps per batch size")
    p.add_argument(
        "--hf-tokens", type=int, default=32, help="greedy tokens per prompt vs transformers"
    )
    p.add_argument(
        "--migration-tokens", type=int, default=600, help="tokens of the migrated request"
    )
    p.add_argument("--skip-migration", action="store_true", help="no two-process migration")
    p.add_argument(
        "--data-plane",
        choices=["auto", "ucx", "tcp"],
        default="auto",
        help="the migration's data plane (auto: ucx if ucxx is installed, else tcp)",
    )
    p.add_argument(
        "--hbm-gbps",
        type=float,
        default=H100_SXM_HBM_GBPS,
        help="memory bandwidth for the roofline, GB/s (default: H100 SXM)",
    )
    p.add_argument(
        "--copy-bytes",
        type=int,
        default=None,
        help="bytes of the bandwidth-measuring copy (default 2 GiB on a GPU, 64 MiB on a CPU)",
    )
    return p.parse_args(argv)  # fmt: skip


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, min(vocab, 256)) for _ in range(n)] for n in (1, 7, 64, 200)]


def _hf_checks(args, progress) -> dict:
    import torch

    from bench import _gpu_model as gm

    out: dict = {}
    tiny = gm.make_engine("tiny", args.device, 8, 512)
    hf_tiny = gm.tiny_in_transformers(tiny, args.device)
    progress("HF-exact: tiny ...")
    tiny_result = gm.compare_with_hf(tiny, hf_tiny, _prompts(258, 1), 2 * args.hf_tokens)
    out["hf_tiny"] = tiny_result
    out["layer_loop_syncs"] = gm.layer_loop_syncs(tiny, _prompts(258, 2)[2], 8)
    del tiny, hf_tiny

    progress(f"HF-exact: random-weight {args.shape} Llama ...")
    started = time.perf_counter()
    path, hf_model = gm.random_checkpoint(args.shape, args.device)
    max_batch = max(args.batches)
    engine = gm.make_engine(
        str(path), args.device, max(max_batch, 8), args.prompt_len + args.decode_steps + 16
    )
    shutil.rmtree(path, ignore_errors=True)  # loaded: 4.4 GB less in /dev/shm
    out["load_s"] = round(time.perf_counter() - started, 1)
    out["hf_model"] = gm.compare_with_hf(
        engine, hf_model, _prompts(engine.model_config.vocab_size, 3), args.hf_tokens
    )
    del hf_model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    out["params_b"] = round(
        engine.model_config.num_params(0, engine.model_config.num_layers) / 1e9, 3
    )

    bandwidth = gm.copy_bandwidth_gbps(args.device, args.copy_bytes)
    out["copy_bandwidth_gbps"] = round(bandwidth, 1)
    rows = []
    for batch in args.batches:
        progress(f"decode throughput, batch {batch} ...")
        t = gm.decode_throughput(
            engine, args.device, batch, args.prompt_len, args.decode_steps, batch
        )
        weights, kv = gm.decode_bytes_per_step(engine, batch, t.mean_context)
        roofline = batch * args.hbm_gbps * 1e9 / (weights + kv)
        measured_roofline = batch * bandwidth * 1e9 / (weights + kv)
        rows.append({
            "batch": batch,
            "tokens_per_s": round(t.tokens_per_s, 1),
            "step_ms": round(t.step_ms, 3),
            "weight_bytes": weights,
            "kv_bytes": kv,
            "roofline_tokens_per_s": round(roofline, 1),
            "roofline_fraction": _figure(t.tokens_per_s / roofline),
            "copy_roofline_fraction": _figure(t.tokens_per_s / measured_roofline),
        })  # fmt: skip
    out["decode"] = rows
    middle = args.batches[len(args.batches) // 2]
    busy = gm.device_busy_ms(engine, middle, args.prompt_len)
    out["device_busy"] = {"batch": middle, "kernel_ms_per_step": busy and round(busy, 3)}
    engine.check_integrity()
    return out


def _figure(x: float) -> float:
    """Four significant digits (a CPU's fraction of an H100's roofline is tiny)."""
    return float(f"{x:.4g}")


def _table(result: dict) -> str:
    lines = [
        f"device {result['env'].get('gpu', result['env']['device'])}, torch {result['env']['torch']},"
        f" transformers {result['env']['transformers']}, float32, kernels torch",
        f"{'check':34} result",
        f"{'HF-exact, tiny':34} {result['hf_tiny']['exact']} ({result['hf_tiny']['tokens']} tokens)",
        f"{'HF-exact, random ' + result['shape']:34} {result['hf_model']['exact']}"
        f" ({result['hf_model']['tokens']} tokens, {result['params_b']} B params)",
        f"{'engine batched = each alone':34} "
        f"{result['hf_tiny']['batched_equals_alone'] and result['hf_model']['batched_equals_alone']}",
        f"{'host syncs inside the layers':34} {result['layer_loop_syncs']}",
    ]
    if "migration_tokens_exact" in result:
        lines.append(
            f"{'live migration, 2 processes':34} {result['migration_tokens_exact']} "
            f"(moved {result['migration_moved']}, {result['migration_tokens']} tokens, "
            f"downtime {result['migration_downtime_ms']} ms, {result['migration_data_plane']})"
        )
    lines += [
        "",
        f"decode, {result['shape']} random weights, prompt {result['prompt_len']}, "
        f"roofline at {result['hbm_gbps']} GB/s (copy measured {result['copy_bandwidth_gbps']} GB/s)",
        f"{'batch':>5} {'tok/s':>10} {'step ms':>9} {'roofline tok/s':>15} {'fraction':>9} {'vs copy':>8}",
    ]
    for r in result["decode"]:
        lines.append(
            f"{r['batch']:5d} {r['tokens_per_s']:10.1f} {r['step_ms']:9.3f} "
            f"{r['roofline_tokens_per_s']:15.1f} {r['roofline_fraction']:9.4g} {r['copy_roofline_fraction']:8.4g}"
        )
    busy = result["device_busy"]
    if busy["kernel_ms_per_step"] is not None:
        lines.append(
            f"GPU kernel time per step at batch {busy['batch']}: {busy['kernel_ms_per_step']} ms "
            "(the rest of step ms: the host)"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    on_gpu = args.device.startswith("cuda")
    if args.copy_bytes is None:
        args.copy_bytes = (2 << 30) if on_gpu else (64 << 20)
    import torch

    from bench import _gpu_model as gm

    if on_gpu and not torch.cuda.is_available():
        print(f"llmesh bench gpu_check: torch {torch.__version__} sees no CUDA device")
        return 2

    def progress(message: str) -> None:
        print(message, flush=True)

    started = time.perf_counter()
    result: dict = {"env": gm.environment(args.device), "shape": args.shape}
    result.update(_hf_checks(args, progress))
    if not args.skip_migration:
        from bench._gpu_migration import run_migration_check

        try:
            result.update(
                run_migration_check(args.device, progress, args.migration_tokens, args.data_plane)
            )
        except Exception as exc:  # reported, not raised: the table and JSON still come out
            progress(f"migration check failed: {exc!r}")
            result.update(
                migration_tokens_exact=False, migration_moved=False, migration_tokens=0,
                migration_downtime_ms=None, migration_bytes=0, migration_stages=0,
                migration_data_plane=args.data_plane, migration_error=repr(exc),
            )  # fmt: skip
    result.update(
        prompt_len=args.prompt_len, decode_steps=args.decode_steps, hbm_gbps=args.hbm_gbps,
        elapsed_s=round(time.perf_counter() - started, 1),
    )  # fmt: skip
    exact = all(
        result[k]["exact"] and result[k]["batched_equals_alone"] for k in ("hf_tiny", "hf_model")
    )
    if not args.skip_migration:
        exact = exact and result["migration_tokens_exact"] and result["migration_moved"]
    result["tokens_exact"] = exact
    print()
    print(_table(result))
    print(json.dumps(result), flush=True)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
