"""`llmesh calibrate`: fit the cost-model executor to the real torch executor."""

from __future__ import annotations

import json
import sys

from services.common.config import flag_type

HELP = "measure the torch executor and fit a cost-model profile (JSON) for the simulator"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="tiny", help="'tiny' or a local HF checkpoint directory")
    parser.add_argument("--out", required=True, help="where to write the profile JSON")
    parser.add_argument("--name", default=None, help="profile name (default: <model>-cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument(
        "--memory-capacity-bytes",
        type=flag_type(int, "memory_capacity_bytes", "--memory-capacity-bytes"),
        default=256 * 1024 * 1024,
        help="weights + KV memory: bytes, or 256MiB, 2GiB",
    )
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed runs per probe (the fastest counts)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="a few small probes only (smoke test)")


def run(args) -> int:
    import torch

    from services.common.config import load_config
    from services.worker.engine import EngineConfig
    from services.worker.engine.calibration import calibrate

    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name or ("tiny-cpu" if args.model == "tiny" else "checkpoint-cpu")
    overrides = {
        "model": args.model,
        "dtype": args.dtype,
        "memory_capacity_bytes": args.memory_capacity_bytes,
    }
    config = load_config(EngineConfig, "ENGINE", overrides)
    print(f"calibrating {args.model} ({args.dtype}, {torch.get_num_threads()} threads)")
    try:
        profile, samples = calibrate(config, name, args.repeats, quick=args.quick)
    except ValueError as exc:
        print(f"llmesh calibrate: {exc}", file=sys.stderr)
        return 2
    print(f"\n  {'probe':<40} {'measured':>10} {'model':>10} {'error':>7}")
    errors = []
    for s in samples:
        predicted = sum(c * f for c, f in zip(profile.coefficients(), s.features, strict=True))
        errors.append(abs(predicted - s.seconds) / s.seconds)
        print(
            f"  {s.label:<40} {s.seconds * 1e3:8.2f}ms {predicted * 1e3:8.2f}ms {errors[-1]:6.1%}"
        )
    profile.save(args.out)
    summary = {
        "out": args.out,
        "mean_relative_error": sum(errors) / len(errors),
        **profile.to_dict(),
    }
    del summary["model"]
    print(json.dumps(summary))
    return 0
