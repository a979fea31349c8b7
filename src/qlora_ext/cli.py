"""The `qlora-ext` command: train, eval, generate (info, profile, fuse, export-adapter: see SUBCOMMANDS).

Every error (bad data, bad flags, a missing model, NaN in training, out of memory, a GPU
failure) prints one line, `qlora-ext: error: <file>:<line>: <what>`, and exits with status 2
(QLORA_EXT_DEBUG=1 shows the traceback instead); Ctrl-C during training saves a checkpoint
and exits with status 130.  What is checked before any work: qlora_ext.cli_checks."""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

from .profile import PROFILER
from .info_command import add_info_command
from .profile_command import add_profile_command
from .export_command import add_export_adapter_command, add_fuse_command
from .cli_args import DEFAULT_MODEL, add_model_args, placement_of_args
from .run_config import RUN_FILE, apply_run_configs, write_run_config

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130

# Settings of `train` that define a run: stored in every checkpoint, and taken from it on
# --resume unless given again on the command line (command line > checkpoint > defaults).
TRAIN_DEFAULTS = {
    "model": DEFAULT_MODEL, "data": None, "eval_data": None, "steps": None, "epochs": None,
    "seq_len": 256, "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "warmup": 0, "schedule": "constant",
    "weight_decay": 0.0, "grad_clip": 1.0, "lora_rank": 16, "lora_alpha": 32.0, "lora_dropout": 0.0,
    "targets": "q,k,v,o,gate,up,down", "pack": False, "seed": 0, "device": "auto", "quantize": "nf4",
    "gradient_checkpointing": None, "eval_accuracy": None, "placement": "auto", "revision": None,
    "eval_every": 0, "save_best": False, "early_stop": 0, "compute_dtype": "fp32", "group_by_length": True,
}
# With the shipped dataset and batch 4: 160 of its 400 examples, 27 s on 2 idle cores; held-out
# exact match 0/32 -> 30/32 at seed 0 (27-29/32 at seeds 1-2; 60 steps did not do better).
DEFAULT_STEPS = 40


def load_model(path, lora=None, **options):
    """The one place the CLI builds a model (tests replace it with a stand-in); options are
    qlora_ext.options.LoadOptions fields, quantize="none" meaning float32."""
    from .api import load_model as _load

    if options.get("quantize") == "none":
        options["quantize"] = None
    return _load(path, lora=lora, **options)


def _say(args, *parts) -> None:
    """Informational lines (off with --quiet); results are printed regardless."""
    if not getattr(args, "quiet", False):
        print(*parts, flush=True)


def _progress(total, desc, args, unit="step"):
    from .progress import Progress

    return Progress(total, desc, unit=unit, enabled=False if args.quiet else None)


def _counted(items, progress):
    """items, ticking progress once per item."""
    for item in items:
        yield item
        progress.update(1)


def _generation_pairs(spec, tok) -> list:
    from .train.data import generation_pairs

    return [pair for path, _ in spec for pair in generation_pairs(path, tok)]


def _eval_report(trainer, eval_loader, pairs, n_acc, args, label) -> dict:
    from .train.loop import exact_match

    out, t0 = {}, time.perf_counter()
    if eval_loader is not None:
        with _progress(-(-len(eval_loader.examples) // eval_loader.batch_rows), f"eval loss ({label})", args,
                       unit="batch") as p:
            loss = trainer.evaluate(b.shard(trainer.rank, trainer.world_size).as_tuple()
                                    for b in _counted(eval_loader, p))
        out["eval_loss"] = loss
        out["eval_ppl"] = math.exp(loss) if loss < 50 else float("inf")
    if pairs and n_acc:
        # "generating", not "accuracy": the count is of answers generated, not of right ones
        with _progress(min(n_acc, len(pairs)), f"generating answers ({label})", args, unit="example") as p:
            acc, outputs = exact_match(trainer.model, pairs[:n_acc], progress=p)
        out["accuracy"] = acc
        out["sample"] = outputs[0]
    parts = [f"eval {label}:"]
    if "eval_loss" in out:
        parts.append(f"loss {out['eval_loss']:.4f}  perplexity {out['eval_ppl']:.2f}")
    if "accuracy" in out:
        n = min(n_acc, len(pairs))
        parts.append(f"exact-match accuracy {out['accuracy']:.1%} ({round(out['accuracy'] * n)}/{n})"
                     f"  first answer: {out['sample']!r}")
    out["seconds"] = time.perf_counter() - t0
    if len(parts) > 1:
        print("  ".join(parts) + f"  [{out['seconds']:.0f}s]", flush=True)
    return out


def _resolved_train_settings(args) -> tuple:
    """(settings dict, checkpoint to resume from or None, out dir, run id), every setting
    checked (a flag by its name, a saved one by its file and key).  The saved settings of a
    resumed run (DIR/run.yaml) and a -c file arrive as args' defaults (run_config); the
    checkpoint's record of the run keeps a resume on the same run and the same adapter shape."""
    from .cli_checks import check_same_adapter_shape, check_train_settings, flag
    from .train.checkpoint import STATE_FILE, latest_checkpoint, read_state
    from .train.outdir import new_run_id

    given = {k: getattr(args, k) for k in TRAIN_DEFAULTS if getattr(args, k) is not None}
    placement = placement_of_args(args, given.get("placement"), given.get("device", TRAIN_DEFAULTS["device"]))
    if placement is not None:
        given["placement"] = placement
    check_train_settings(given, flag)
    ckpt, run_id = None, new_run_id()
    if args.resume:
        ckpt = latest_checkpoint(args.resume)
        if ckpt is None:
            raise OSError(f"{args.resume}: no complete checkpoint-<step>/ directory to resume from")
        if not (Path(args.resume) / RUN_FILE).is_file():
            raise OSError(f"{Path(args.resume) / RUN_FILE}: missing, so the run's settings are unknown; "
                          "give them with -c FILE")
        run = read_state(ckpt).get("run", {})
        saved = {k: v for k, v in run.items() if k in TRAIN_DEFAULTS}
        check_train_settings(saved, lambda k: f"{ckpt / STATE_FILE}: run.{k}")
        run_id = run.get("run_id", run_id)
        check_same_adapter_shape(given, saved, ckpt)
    settings = {**TRAIN_DEFAULTS, **given}
    if args.steps is not None and args.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if args.steps is not None or args.epochs is not None:  # a new length replaces the saved one
        settings["steps"], settings["epochs"] = args.steps, args.epochs
    out = args.out or args.resume
    if not out:
        raise ValueError("train needs --out DIR (or --resume DIR)")
    if args.overwrite and ckpt is not None and Path(out).resolve() == Path(args.resume).resolve():
        raise ValueError("--overwrite would delete the run that --resume continues; give one of them")
    return settings, ckpt, Path(out), run_id


def _check_periodic_eval(s, eval_data) -> None:
    for name in ("eval_every", "early_stop"):
        if s[name] < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {s[name]}")
    if s["eval_every"] and not eval_data:
        raise ValueError("--eval-every needs eval data: give --eval-data FILE")
    for name in ("save_best", "early_stop"):
        if s[name] and not s["eval_every"]:
            raise ValueError(f"--{name.replace('_', '-')} needs --eval-every N")


def cmd_train(args) -> int:
    from .cli_checks import MAX_STEPS, bounded_threads, check_flags, check_lora_fits, int_in, prepare_train_outputs
    from .train.distributed import get_comm

    comm = get_comm()  # under mpiexec: MPI starts on every rank before anything can fail on one
    if comm.rank:  # rank 0 alone talks; every rank's errors still reach stderr
        args.quiet, sys.stdout = True, open(os.devnull, "w")
    s, ckpt, out, run_id = _resolved_train_settings(args)
    check_flags(args, {"save_every": int_in(0, MAX_STEPS), "keep_last": int_in(0, MAX_STEPS)})
    args.threads = bounded_threads(args.threads)
    check_lora_fits(s["model"], s["lora_rank"], s["targets"])
    lock = prepare_train_outputs(args, comm, out, ckpt)
    try:
        return _train(args, comm, s, ckpt, out, run_id)
    finally:
        if lock is not None:
            lock.release()


def _train(args, comm, s, ckpt, out, run_id) -> int:
    from .data import dataset_path
    from .finite import NonFiniteError, json_safe
    from .model.lora import LoraConfig
    from .train.checkpoint import latest_checkpoint, save_adapter_atomic
    from .train.data import DataLoader, check_records, load_data, parse_data_spec, require_tokenizer
    from .train.loop import MetricsLog, PeriodicEval, fit, restore
    from .train.schedule import check_schedule
    from .train.trainer import TrainConfig, Trainer

    shipped = s["data"] is None
    data = s["data"] or str(dataset_path("train"))
    eval_data = s["eval_data"] or (str(dataset_path("eval")) if shipped else None)
    if s["steps"] is not None:
        check_schedule(s["schedule"], s["warmup"], s["steps"])  # before the model loads
    _check_periodic_eval(s, eval_data)
    data_spec = parse_data_spec(data, "--data")
    eval_spec = parse_data_spec(eval_data, "--eval-data") if eval_data else None
    for path, _ in data_spec + (eval_spec or []):
        check_records(path)  # bad data fails before the model loads
    lora = LoraConfig(r=s["lora_rank"], alpha=s["lora_alpha"], dropout=s["lora_dropout"],
                      target_modules=tuple(t.strip() for t in s["targets"].split(",") if t.strip()),
                      compute_dtype=s["compute_dtype"])
    t0 = time.perf_counter()
    # Each rank its own dropout stream (the seed also draws LoRA A, but sync_trainer below
    # gives every rank rank 0's adapters); rank 0 keeps the single-process seed.
    model = load_model(s["model"], lora=lora, device=s["device"], quantize=s["quantize"],
                       threads=args.threads if args.threads is not None else comm.default_threads(),
                       seed=s["seed"] + 7919 * comm.rank, gradient_checkpointing=s["gradient_checkpointing"],
                       progress=False if args.quiet else None, placement=s["placement"],
                       batch_shape=(s["batch_size"], s["seq_len"]), revision=s["revision"])
    tok = require_tokenizer(model.tokenizer, s["model"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    examples, stats = load_data(data_spec, tok, s["seq_len"], progress=False if args.quiet else None)
    rows_per_batch = s["batch_size"] * s["grad_accum"]
    loader = DataLoader(examples, s["seq_len"], rows_per_batch, seed=s["seed"], pack=s["pack"], pad_id=pad,
                        pad_multiple=model.pad_multiple, group_by_length=s["group_by_length"])
    if s["steps"] is not None:
        total = s["steps"]
    elif s["epochs"] is not None:
        total = max(1, math.ceil(s["epochs"] * loader.batches_per_epoch))
    else:
        total = DEFAULT_STEPS if shipped else loader.batches_per_epoch
    n_params = sum(a.size for a in model.parameters().values())
    _say(args, f"model: {s['model']} loaded in {time.perf_counter() - t0:.1f}s; LoRA r={lora.r} alpha={lora.alpha:g} "
               f"on {','.join(lora.target_modules)}: {n_params:,} trainable parameters")
    if hasattr(model, "placement"):
        _say(args, f"placement: {model.placement}" + (f" ({model.placement_reason})" if model.placement_reason else ""))
    _say(args, _base_products_line(getattr(model, "placement", "cpu"), lora.compute_dtype))
    _say(args, f"data: {data}: {stats.examples} examples, {stats.tokens:,} tokens"
               + (" (tokenized earlier: from the cache)" if stats.cached else "")
               + (f", {stats.truncated} truncated to {s['seq_len']}" if stats.truncated else "")
               + (f", {stats.dropped} dropped (no target)" if stats.dropped else "")
               + f"; {total} steps of {rows_per_batch} rows ({total / loader.batches_per_epoch:.2f} epochs)")
    config = TrainConfig(lr=s["lr"], warmup=s["warmup"], schedule=s["schedule"], weight_decay=s["weight_decay"],
                         grad_clip=s["grad_clip"], grad_accum=s["grad_accum"], seed=s["seed"], total_steps=total)
    trainer = Trainer(model, config, comm=comm)
    eval_loader = pairs = None
    if eval_data:
        ev, _ = load_data(eval_spec, tok, s["seq_len"], progress=False if args.quiet else None)
        eval_loader = DataLoader(ev, s["seq_len"], s["batch_size"], pad_id=pad, shuffle=False,
                                 pad_multiple=model.pad_multiple)
        pairs = _generation_pairs(eval_spec, tok)
    n_acc = s["eval_accuracy"] if s["eval_accuracy"] is not None \
        else (len(pairs or ()) if shipped or s["eval_every"] else 0)
    periodic = None
    if s["eval_every"]:
        periodic = PeriodicEval(s["eval_every"], lambda: _eval_report(trainer, eval_loader, pairs, n_acc, args,
                                                                      f"step {trainer.step_count}"),
                                patience=s["early_stop"], best_dir=out / "best" if s["save_best"] else None)
    elapsed, before = 0.0, None
    if ckpt is not None:
        state = restore(trainer, loader, ckpt)
        elapsed = float(state.get("elapsed", 0.0))
        if periodic is not None:
            periodic.load_state_dict(state.get("periodic_eval"))
        before = state.get("run", {}).get("eval_before")  # measured by the run's first segment
        _say(args, f"resumed from {ckpt} (step {trainer.step_count})")
    elif eval_data:
        before = _eval_report(trainer, eval_loader, pairs, n_acc, args, "before")
    comm.sync_trainer(trainer, loader)  # all ranks continue from rank 0's weights, moments, position
    out.mkdir(parents=True, exist_ok=True)
    if trainer.is_writer:
        write_run_config(out / RUN_FILE, {**{k: s[k] for k in TRAIN_DEFAULTS}, "data": data, "eval_data": eval_data,
                                          "save_every": args.save_every, "keep_last": args.keep_last})
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=trainer.step_count if ckpt else None) \
        if trainer.is_writer else None
    run = dict(s, steps=s["steps"], data=data, eval_data=eval_data, eval_before=before, run_id=run_id)

    stop = {"flag": False}

    def on_sigint(signum, frame):
        if stop["flag"]:  # a second Ctrl-C: give up at once (checkpoints stay atomic)
            raise KeyboardInterrupt
        stop["flag"] = True
        print("\nqlora-ext: interrupted; saving a checkpoint after this step (Ctrl-C again to quit now)",
              file=sys.stderr, flush=True)

    old = signal.signal(signal.SIGINT, on_sigint)
    if (args.trace or args.plot) and trainer.is_writer:
        PROFILER.start(model=str(args.model), placement=model.placement)
    try:
        with _progress(total, "train", args) as bar:
            bar.update(trainer.step_count)
            result = fit(trainer, loader, total, s["batch_size"], out_dir=out, save_every=args.save_every,
                         keep_last=args.keep_last, metrics=metrics, progress=bar,
                         should_stop=lambda: comm.any_true(stop["flag"]), run=run, elapsed=elapsed,
                         periodic_eval=periodic)
    except NonFiniteError as e:
        last = latest_checkpoint(out)
        raise NonFiniteError(f"{e}; " + (f"the newest good checkpoint is {last}" if last else
                                         "no checkpoint was saved before it")) from None
    finally:
        signal.signal(signal.SIGINT, old)
        if metrics is not None:
            metrics.close()
        if PROFILER.enabled:
            PROFILER.stop()
            if args.trace:
                PROFILER.write_trace(args.trace)
            if args.plot:
                PROFILER.plot(args.plot)
    if result["status"] == "stopped":
        print(f"qlora-ext: stopped at step {result['step']}; checkpoint saved in {out}; "
              f"continue with --resume {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result["status"] == "early_stopped":
        print(f"early stop at step {result['step']}: no lower eval loss in {s['early_stop']} evals; best "
              f"{periodic.best:.4f} at step {periodic.best_step}" + (f" (adapter in {out / 'best'})" if s["save_best"] else ""))
    if trainer.is_writer:
        with _progress(1, "saving adapter", args, unit="file") as p:
            save_adapter_atomic(model, out)
            p.update(1)
    tokens, padded = sum_tokens(out / "metrics.jsonl") if trainer.is_writer else (0, 0)
    speed = f"{tokens / result['elapsed']:.0f} tokens/s" if result["elapsed"] and tokens else "nan tokens/s"
    if padded:
        speed += f" on real tokens; {1 - tokens / padded:.0%} of the computed ones were padding"
    print(f"trained {result['step']} steps in {result['elapsed']:.1f}s ({speed}); "
          f"final loss {trainer.last_loss:.4f}; adapter saved to {out}")
    after = _eval_report(trainer, eval_loader, pairs, n_acc, args, "after") if eval_data else None
    if trainer.is_writer and (before is not None or after is not None):
        (out / "eval.json").write_text(json.dumps(json_safe({"before": before, "after": after}), indent=1,
                                                  allow_nan=False))
    return 0


def sum_tokens(metrics_path) -> tuple:
    """(real tokens, computed tokens with padding) of the run's training steps so far."""
    tokens = padded = 0
    for line in Path(metrics_path).read_text().splitlines():
        record = json.loads(line)
        tokens += record.get("tokens") or 0
        padded += record.get("padded_tokens") or record.get("tokens") or 0
    return tokens, padded


def _base_products_line(placement: str, compute_dtype: str) -> str:
    """Which precision the frozen base's products use (the CPU's; on a GPU they are fp32)."""
    from .cpu.base_matmul import describe

    if placement in ("gpu", "split"):
        return f"base products: fp32 ({placement} placement: the projections run on the GPU; compute_dtype " \
               "applies to CPU products)"
    return f"base products: {describe(compute_dtype)}"


def _model_with_adapter(args):
    from .model.lora import LoraConfig

    placement = placement_of_args(args, args.placement, args.device) or "auto"
    model = load_model(args.model, lora=LoraConfig(compute_dtype=args.compute_dtype), device=args.device,
                       placement=placement, threads=args.threads, progress=False if args.quiet else None,
                       revision=args.revision)
    if not args.quiet and hasattr(model, "placement"):
        # stderr: generate's stdout is the generated text alone
        print(f"placement: {model.placement}" + (f" ({model.placement_reason})" if model.placement_reason else ""),
              file=sys.stderr, flush=True)
    if args.adapter:
        model.load_adapter(args.adapter)
    return model


def cmd_eval(args) -> int:
    from .data import dataset_path
    from .cli_checks import MAX_ROWS, MAX_SEQ_LEN, MAX_STEPS, bounded_threads, check_flags, int_in
    from .train.data import DataLoader, check_records, load_data, parse_data_spec, require_tokenizer
    from .train.trainer import evaluate_loss

    check_flags(args, {"seq_len": int_in(1, MAX_SEQ_LEN), "batch_size": int_in(1, MAX_ROWS),
                       "accuracy": int_in(0, MAX_STEPS)})
    args.threads = bounded_threads(args.threads)
    data = args.data or str(dataset_path("eval"))
    spec = parse_data_spec(data, "--data")
    for path, _ in spec:
        check_records(path)  # bad data fails before the model loads
    model = _model_with_adapter(args)
    tok = require_tokenizer(model.tokenizer, args.model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    examples, stats = load_data(spec, tok, args.seq_len, progress=False if args.quiet else None)
    loader = DataLoader(examples, args.seq_len, args.batch_size, pad_id=pad, shuffle=False,
                        pad_multiple=model.pad_multiple)
    with _progress(-(-len(examples) // args.batch_size), "eval loss", args, unit="batch") as p:
        loss = evaluate_loss(model, (b.as_tuple() for b in _counted(loader, p)))
    line = f"loss {loss:.4f}  perplexity {math.exp(loss) if loss < 50 else float('inf'):.2f}  " \
           f"({stats.examples} examples, {stats.tokens:,} tokens)"
    n_acc = args.accuracy if args.accuracy is not None else (len(examples) if args.data is None else 0)
    if n_acc:
        from .train.loop import exact_match

        pairs = _generation_pairs(spec, tok)[:n_acc]
        with _progress(len(pairs), "generating answers", args, unit="example") as p:
            acc, _ = exact_match(model, pairs, progress=p)
        line += f"  exact-match accuracy {acc:.1%} ({round(acc * len(pairs))}/{len(pairs)})"
    print(line)
    return 0


def cmd_generate(args) -> int:
    from .cli_checks import MAX_NEW_TOKENS, MAX_SEED, MAX_TOP_K, bounded_threads, check_flags, int_in, real
    from .train.data import require_tokenizer

    check_flags(args, {"max_new_tokens": int_in(0, MAX_NEW_TOKENS), "temperature": real(lambda v: v >= 0, ">= 0"),
                       "top_p": real(lambda v: 0 < v <= 1, "in (0, 1]"), "top_k": int_in(0, MAX_TOP_K),
                       "seed": int_in(0, MAX_SEED)})
    args.threads = bounded_threads(args.threads)
    model = _model_with_adapter(args)
    tok = require_tokenizer(model.tokenizer, args.model, need_eos=False)
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
    else:
        ids = tok.encode(args.prompt, add_special_tokens=True)
    eos = tok.eos_token_id
    stop = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else None)
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop_ids=stop)
    print(tok.decode(out, skip_special_tokens=True))
    return 0


def _add_model_args(p):
    add_model_args(p)
    p.add_argument("--adapter", help="PEFT adapter directory (e.g. a train --out DIR)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_train_command(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a LoRA adapter on a JSONL file",
                       description="Fine-tune LoRA adapters on an NF4 base model. Without --data, the shipped "
                                   "'records' dataset is used, with eval loss and exact-match accuracy "
                                   "before and after.")
    d = TRAIN_DEFAULTS
    # defaults are None here so that --resume can tell given flags from saved settings
    p.add_argument("-c", "--config", metavar="FILE.yaml",
                   help="settings from a YAML file whose keys are these flags' names (seq-len or seq_len); "
                        "flags given here override it; every run writes its own to --out/run.yaml")
    add_model_args(p, run_setting=True, backward=True)
    p.add_argument("--data", metavar="FILE[:W],...",
                   help='JSONL or Parquet with "text", "prompt"+"completion" or "messages" records; several files '
                        "are concatenated, or mixed with weights: a.jsonl:0.7,b.jsonl:0.3 (each epoch draws that "
                        "share of its rows from each file, seeded by --seed). Default: the shipped dataset")
    p.add_argument("--eval-data", metavar="FILE,...",
                   help="JSONL or Parquet for eval loss (and accuracy) before and after training")
    p.add_argument("--out", help="output directory (adapter, checkpoint-<step>/, metrics.jsonl)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help=f"optimizer updates (default: {DEFAULT_STEPS} on the shipped dataset, else 1 epoch)")
    g.add_argument("--epochs", type=float, help="passes over the data (instead of --steps)")
    p.add_argument("--seq-len", type=int, help=f"max tokens per row (default {d['seq_len']})")
    p.add_argument("--batch-size", type=int, help=f"rows per micro-batch (default {d['batch_size']})")
    p.add_argument("--grad-accum", type=int, help=f"micro-batches per update (default {d['grad_accum']})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {d['lr']:g})")
    p.add_argument("--warmup", type=int, help="warmup updates (default 0)")
    p.add_argument("--schedule", choices=("constant", "linear", "cosine"), help="lr after warmup (default constant)")
    p.add_argument("--weight-decay", type=float, help="AdamW decoupled weight decay (default 0)")
    p.add_argument("--grad-clip", type=float, help="global grad-norm clip, 0 = off (default 1.0)")
    p.add_argument("--lora-rank", type=int, help=f"LoRA r (default {d['lora_rank']})")
    p.add_argument("--lora-alpha", type=float, help=f"LoRA alpha (default {d['lora_alpha']:g})")
    p.add_argument("--lora-dropout", type=float, help="dropout on the adapter input (default 0)")
    p.add_argument("--targets", help=f"projections to adapt (default {d['targets']})")
    p.add_argument("--pack", action="store_const", const=True,
                   help="pack whole examples into rows of --seq-len instead of padding each; packed examples "
                        "do not attend to each other and restart their positions")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction,
                   help="batch rows of similar length together (seeded by --seed), so that each batch, padded "
                        "to its longest row, holds little padding (default on; --no-group-by-length: plain "
                        "shuffle)")
    p.add_argument("--quantize", choices=("nf4", "none"), help="base weights format (default nf4)")
    p.add_argument("--eval-accuracy", type=int, metavar="N",
                   help="exact-match accuracy on the first N eval examples (default: all, shipped dataset only)")
    p.add_argument("--eval-every", type=int, metavar="N",
                   help="eval loss, perplexity and exact-match accuracy (prompt/completion data) on the eval "
                        "data every N updates, written to metrics.jsonl (default 0 = before and after only)")
    p.add_argument("--save-best", action="store_const", const=True,
                   help="keep the adapter with the lowest eval loss in --out/best/ (needs --eval-every)")
    p.add_argument("--early-stop", type=int, metavar="N",
                   help="stop after N evals in a row without a lower eval loss (needs --eval-every; default 0 = off)")
    p.add_argument("--save-every", type=int, default=50,
                   help="checkpoint every N steps, 0 = only at the end (default 50; always at the end)")
    p.add_argument("--keep-last", type=int, default=3,
                   help="keep only the newest K checkpoints, 0 = all (default 3)")
    p.add_argument("--resume", metavar="DIR", help="continue from the newest complete checkpoint in DIR")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an earlier run's files in --out (checkpoints, metrics, adapter) before starting; "
                        "without it such a directory is refused")
    p.add_argument("--seed", type=int, help="seed for LoRA init, data order, dropout (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no setup lines (results still print)")
    p.add_argument("--trace", metavar="FILE.json", help="write a Chrome/Perfetto trace of the training steps")
    p.add_argument("--plot", metavar="FILE.png", help="draw the CPU/GPU split of the steps (needs matplotlib)")
    p.set_defaults(func=cmd_train)


def add_eval_command(sub) -> None:
    p = sub.add_parser("eval", help="loss and perplexity of a model (+ adapter) on a JSONL file")
    _add_model_args(p)
    p.add_argument("--data", metavar="FILE,...", help="JSONL or Parquet file(s) (default: the shipped eval split)")
    p.add_argument("--seq-len", type=int, default=TRAIN_DEFAULTS["seq_len"],
                   help=f"max tokens per row; longer examples are cut (default {TRAIN_DEFAULTS['seq_len']})")
    p.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS["batch_size"],
                   help=f"rows per forward pass (default {TRAIN_DEFAULTS['batch_size']})")
    p.add_argument("--accuracy", type=int, metavar="N",
                   help="also greedy exact-match accuracy on the first N examples (default: all on the shipped split)")
    p.set_defaults(func=cmd_eval)


def add_generate_command(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    p.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many new tokens (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: sample from the smallest set of tokens holding this probability "
                        "(default 1.0 = all; only with --temperature > 0)")
    from .model.generate import DEFAULT_TOP_K

    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                   help=f"sample from the K most likely tokens, before --top-p (default {DEFAULT_TOP_K}, as "
                        "transformers; 0 = all; only with --temperature > 0)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.set_defaults(func=cmd_generate)


# Each entry adds one subcommand (a parser with set_defaults(func=...)).
SUBCOMMANDS = [add_train_command, add_eval_command, add_generate_command, add_info_command, add_profile_command,
               add_fuse_command, add_export_adapter_command]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2, as for every other usage error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="qlora-ext", description="QLoRA fine-tuning on CPU and any WebGPU GPU")
    parser.add_argument("--version", action="version", version=f"qlora-ext {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                help="what to do (qlora-ext COMMAND --help describes its flags)")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    from .train.distributed import abort_job

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = apply_run_configs(parser, args, argv)  # -c FILE and --resume DIR's run.yaml
        return args.func(args)
    except KeyboardInterrupt:
        abort_job("qlora-ext: interrupted", EXIT_INTERRUPTED)
        print("qlora-ext: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # every failure is one line; QLORA_EXT_DEBUG=1 shows the traceback
        if os.environ.get("QLORA_EXT_DEBUG", "").strip() not in ("", "0"):
            raise
        from .cli_checks import error_line

        msg = f"qlora-ext: error: {error_line(e)}"
        abort_job(msg, EXIT_USAGE)  # under mpiexec: name the rank, stop all
        print(msg, file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
