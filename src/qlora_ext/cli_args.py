"""The flags every command that loads a model shares (--model, --revision, --device,
--placement, the deprecated --mode, --threads, --compute-dtype, --gradient-checkpointing), so
that train, eval, generate and profile say the same thing the same way."""
from __future__ import annotations

import argparse
import sys

from .options import DEPRECATED_MODES, DEVICES, PLACEMENTS, placement_of_mode

DEFAULT_MODEL = "smollm2-135m"
COMPUTE_DTYPE_HELP = ("precision of the frozen base's CPU products: fp32 (exact) or bf16 (bf16 operands, "
                      "fp32 sums; twice as fast on CPUs with AVX512-BF16); adapters always train in fp32")
PLACEMENT_HELP = ("where the step runs: cpu; split (projections, FFN and LM head on the GPU; norms, RoPE and "
                  "attention on the CPU); gpu (the whole step on the GPU); auto: gpu when a GPU's free memory "
                  "holds it, else split where a GPU serves, else cpu (the output says which and why)")
DEVICE_HELP = ("which GPU adapters count: auto (hardware GPUs), gpu (software adapters such as lavapipe too), "
               "cpu (none: the cpu placement)")
CHECKPOINTING_HELP = ("recompute activations in the backward on every layer (--no-gradient-checkpointing: on "
                      "none); default: the fewest layers that make the step fit the GPU's free memory")


def add_model_args(p, run_setting: bool = False, backward: bool = False, model_help: str | None = None) -> None:
    """run_setting: the defaults are None (train: a flag not given keeps a resumed run's
    setting; the defaults are cli.TRAIN_DEFAULTS'); backward: the command trains, so
    --gradient-checkpointing applies."""
    default = (lambda v: None) if run_setting else (lambda v: v)
    p.add_argument("--model", default=default(DEFAULT_MODEL),
                   help=model_help or f"HF model directory, .gguf file, known name or hub id such as "
                                      f"Qwen/Qwen3-0.6B[@rev] (default {DEFAULT_MODEL})")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) when --model is a hub id")
    p.add_argument("--device", default=default("auto"), choices=DEVICES, help=DEVICE_HELP + " (default auto)")
    # no default: a --mode given alone (deprecated) must be told from an explicit --placement
    p.add_argument("--placement", choices=PLACEMENTS, help=PLACEMENT_HELP + " (default auto)")
    # deprecated (--mode resident is --placement gpu): still taken, with a line on stderr; not listed
    p.add_argument("--mode", choices=tuple(DEPRECATED_MODES), help=argparse.SUPPRESS)
    if backward:
        p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                       help=CHECKPOINTING_HELP)
    p.add_argument("--threads", type=int, help="CPU threads for the kernels (default: all cores)")
    p.add_argument("--compute-dtype", default=default("fp32"), choices=("fp32", "bf16"),
                   help=COMPUTE_DTYPE_HELP + " (default fp32)")


def placement_of_args(args, placement: str | None, device: str) -> str | None:
    """`placement` (--placement or a saved setting), or where it is None the placement the
    deprecated --mode names, with a line on stderr."""
    mode = getattr(args, "mode", None)
    if mode is None:
        return placement
    new = placement_of_mode(mode, device)
    print(f"qlora-ext: --mode is deprecated: use --placement {new}"
          + (f" (--placement {placement} given: it wins)" if placement is not None else ""),
          file=sys.stderr, flush=True)
    return placement if placement is not None else new
