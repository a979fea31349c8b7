"""`qlora-ext profile`: run a few training steps with the step profiler on and print where
the time goes (phase, device, ms per step, share; CPU, GPU, transfer, wait, overlap, idle).
Optionally writes a Chrome/Perfetto trace (--trace) and a chart (--plot)."""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from .cli_args import add_model_args, placement_of_args
from .profile import PROFILER


def add_profile_command(sub) -> None:
    p = sub.add_parser("profile", help="profile training steps: time per phase and device, CPU/GPU overlap")
    add_model_args(p, backward=True)
    p.add_argument("--steps", type=int, default=3, help="profiled steps, after one warm-up step (default 3)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row of the profiled step (default 256)")
    p.add_argument("--batch-size", type=int, help="rows of the profiled step (default 1; 2 with --placement "
                                                   "split, so that --lanes 2 can overlap CPU and GPU work)")
    p.add_argument("--lanes", type=int, help="split placement: micro-batches in flight at once (default 1, one "
                                             "pass; 2 overlaps one lane's CPU attention with the other's GPU work)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA r of the adapters (default 16)")
    p.add_argument("--quantize", default="nf4", choices=("nf4", "none"), help="base weights format (default nf4)")
    p.add_argument("--trace", metavar="FILE.json", help="write a Chrome/Perfetto trace")
    p.add_argument("--plot", metavar="FILE.png", help="draw the split as a chart (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args) -> int:
    import qlora_ext as qx
    from .cli_checks import (MAX_RANK, MAX_ROWS, MAX_SEQ_LEN, bounded_threads, check_flags, check_lora_fits,
                             check_output_file, check_plot_output, int_in)
    from .device import adapter_info

    check_flags(args, {"steps": int_in(1, 10**6), "seq_len": int_in(1, MAX_SEQ_LEN),
                       "batch_size": int_in(1, MAX_ROWS), "lora_rank": int_in(1, MAX_RANK),
                       "lanes": int_in(1, MAX_ROWS)})
    threads = bounded_threads(args.threads)
    check_lora_fits(args.model, args.lora_rank, None)
    if args.trace:  # outputs fail now, not after the profiled steps
        check_output_file("--trace", args.trace)
    if args.plot:
        check_plot_output(args.plot)
    placement = placement_of_args(args, args.placement, args.device) or "auto"
    # a GPU placement asked for by name may take a software adapter (lavapipe: the profile of CI)
    device = "gpu" if placement in ("gpu", "split") and args.device == "auto" else args.device
    if args.batch_size is None:
        args.batch_size = 2 if placement == "split" else 1
    model = qx.load_model(args.model, lora=qx.LoraConfig(r=args.lora_rank, alpha=2 * args.lora_rank),
                          quantize=None if args.quantize == "none" else args.quantize, device=device,
                          threads=threads, placement=placement, gradient_checkpointing=args.gradient_checkpointing,
                          revision=args.revision, compute_dtype=args.compute_dtype, lanes=args.lanes)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, (args.batch_size, args.seq_len))
    # the Trainer's step in either placement: what `qlora-ext train` runs
    trainer = qx.Trainer(model, qx.TrainConfig(lr=2e-4))
    step = lambda: trainer.step(ids, ids)  # noqa: E731
    step()  # warm-up: buffers, pipelines, BLAS threads
    info = adapter_info() if device != "cpu" else None
    PROFILER.start(model=str(args.model), placement=model.placement,
                   adapter=(info or {}).get("name", "none (CPU backend)"),
                   tokens_per_step=args.batch_size * args.seq_len,
                   **({"lanes": min(model.lanes, args.batch_size)} if model.placement == "split" else {}))
    t0 = time.perf_counter()
    try:
        for _ in range(args.steps):
            with PROFILER.step():
                step()
    finally:
        PROFILER.stop()
    wall = time.perf_counter() - t0
    summary = PROFILER.summary()
    summary["totals"]["tokens_per_s"] = args.steps * args.batch_size * args.seq_len / wall
    if args.json:
        print(json.dumps(summary))
    else:
        print(PROFILER.table())
        print(f"tokens/s: {summary['totals']['tokens_per_s']:.1f}")
    if args.trace:
        PROFILER.write_trace(args.trace)
        print(f"trace: {args.trace} (open in https://ui.perfetto.dev or chrome://tracing)", file=sys.stderr)
    if args.plot:
        PROFILER.plot(args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0
