"""`qlora-ext info`: the version, the CPU's SIMD path, the GPU adapter and whether the gpu
placement can run there, the default model and the shipped dataset."""
from __future__ import annotations

import json
import sys


def cmd_info(args) -> int:
    from .cli import DEFAULT_MODEL
    from . import __version__

    info = {"version": __version__, "python": sys.version.split()[0]}
    try:
        from . import cpu_features

        info["cpu_features"] = cpu_features()
    except ImportError as e:
        info["cpu_features"] = f"unavailable: {e}"
    try:
        from .device import adapter_info
    except ImportError:
        info["gpu_adapter"] = "unavailable: this build has no qlora_ext.device module"
    else:
        try:
            info["gpu_adapter"] = adapter_info()
        except Exception as e:  # a broken driver must not break `info`, whose job is to report it
            info["gpu_adapter"] = f"unavailable: {type(e).__name__}: {e}"
    try:
        from .gpu.runtime import pick_adapter, unavailable_reason
        from .placement import gpu_free_bytes

        reason = unavailable_reason()
        real = pick_adapter(allow_software=False)
        if reason:
            info["gpu_placement"] = f"unavailable: {reason}"
        elif real is None:
            info["gpu_placement"] = "with --device gpu only (no hardware GPU: software adapter)"
        else:
            free, source = gpu_free_bytes(real)
            info["gpu_placement"] = ("available; GPU free memory " + (f"{free / 2**30:.1f} GiB ({source})"
                                          if free is not None else source))
    except Exception as e:  # as for the adapter: report, don't fail
        info["gpu_placement"] = f"unavailable: {type(e).__name__}: {e}"
    try:
        from .model.loading import resolve_model_path

        info["default_model"] = resolve_model_path(DEFAULT_MODEL)
    except OSError as e:
        info["default_model"] = f"missing: {e}"
    from .data import dataset_path

    info["dataset"] = {split: str(dataset_path(split)) for split in ("train", "eval")}
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        for k, v in info.items():
            print(f"{k}: {json.dumps(v, default=str) if isinstance(v, dict) else v}")
    return 0


def add_info_command(sub) -> None:
    p = sub.add_parser("info", help="version, CPU features, GPU adapter, default model")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_info)
