"""`qlora-ext fuse` (the adapter merged into the base: an HF directory and/or a GGUF file)
and `qlora-ext export-adapter` (the adapter as llama.cpp's LoRA GGUF)."""
from __future__ import annotations

import json
import os
import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """"5GB" -> 5e9 bytes, "500MiB" -> 500 * 2**20, "1024" -> 1024 (transformers' units)."""
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").upper() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{flag}: {text!r} is not a size such as 5GB, 500MB or 1048576")
    return int(float(m.group(1)) * _UNITS[unit])


def _say(args, *parts) -> None:
    if not args.quiet:
        print(*parts, flush=True)


def cmd_fuse(args) -> int:
    from .model.fuse import fuse

    if args.out is None and args.gguf is None:
        raise ValueError("fuse needs --out DIR and/or --gguf FILE")
    result = fuse(_base_model(args), args.adapter, out=args.out, gguf=args.gguf, outtype=args.outtype,
                  dequantize=args.dequantize, revision=args.revision,
                  max_shard_size=parse_size(args.max_shard_size))
    what = "the NF4-dequantized base" if args.dequantize else "the base's original weights"
    if result["out"]:
        _say(args, f"fused {args.adapter} into {what}: {result['out']} (transformers: "
                   f"AutoModelForCausalLM.from_pretrained({result['out']!r}))")
    if result["gguf"]:
        _say(args, f"fused {args.adapter} into {what}: {result['gguf']} ({args.outtype}; llama.cpp: "
                   f"llama-cli -m {result['gguf']})")
    return 0


def _adapter_base(adapter: str) -> str | None:
    try:
        with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
            return (json.load(f) or {}).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None  # load_peft_adapter below names what is wrong with the adapter


def _base_model(args) -> str:
    model = args.model or _adapter_base(args.adapter)
    if not model:
        raise ValueError(f"{args.adapter}: adapter_config.json names no base_model_name_or_path; give --model")
    return model


def cmd_export_adapter(args) -> int:
    from .model.fuse import BaseCheckpoint, adapter_for
    from .model.gguf_export import write_adapter_gguf

    model = _base_model(args)
    with BaseCheckpoint(model, revision=args.revision) as base:
        config = base.config
    lora, lm_head = adapter_for(args.adapter, config, model)
    path = write_adapter_gguf(args.gguf, lora, config, outtype=args.outtype, lm_head=lm_head)
    _say(args, f"wrote {path}: LoRA r={lora.config.r} alpha={lora.config.alpha:g} on "
               f"{len(lora.pairs)} projections ({args.outtype}; llama.cpp: llama-cli -m BASE.gguf --lora {path})")
    return 0


def add_fuse_command(sub) -> None:
    p = sub.add_parser("fuse", help="merge an adapter into its base: an HF directory and/or a GGUF file",
                       description="W + (alpha/r)·B·A for every adapted projection, from the base checkpoint's "
                                   "own weights in their dtype (not the NF4 copy unless --dequantize).")
    p.add_argument("--model", help="base: HF model directory, .gguf file, known name or hub id "
                                   "(default: the adapter's base_model_name_or_path)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) when --model is a hub id")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory (e.g. a train --out DIR)")
    p.add_argument("--out", help="new HF model directory: config.json, safetensors in the base's dtype, tokenizer")
    p.add_argument("--gguf", metavar="FILE", help="also (or only) write a GGUF file for llama.cpp")
    p.add_argument("--outtype", default="f16", choices=("f32", "f16", "bf16", "q8_0"),
                   help="tensor type of the GGUF's matrices (default f16; norms stay f32)")
    p.add_argument("--dequantize", action="store_true",
                   help="merge into the NF4 round trip of the base (the weights training saw) instead of the original")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors shard of --out, e.g. 2GB or 500MB (default 5GB)")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    p.set_defaults(func=cmd_fuse)


def add_export_adapter_command(sub) -> None:
    p = sub.add_parser("export-adapter", help="write an adapter as llama.cpp's LoRA GGUF (for its --lora flag)")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory (e.g. a train --out DIR)")
    p.add_argument("--gguf", required=True, metavar="FILE", help="output .gguf file")
    p.add_argument("--model", help="the base it was trained on, for its architecture and shapes "
                                   "(default: the adapter's base_model_name_or_path)")
    p.add_argument("--revision", help="hub revision when --model is a hub id")
    p.add_argument("--outtype", default="f32", choices=("f32", "f16", "bf16"),
                   help="tensor type of lora_a/lora_b (default f32)")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    p.set_defaults(func=cmd_export_adapter)
