"""The training loop around a Trainer: global batches from a DataLoader, this rank's slice
in micro-batches, metrics lines, periodic atomic checkpoints, a stop flag (Ctrl-C), resume.

What a checkpoint's trainer_state.json holds (besides the Trainer's own state): the data
position, the model's dropout step counter (its only randomness), elapsed seconds and the
run's settings, so that a resumed run reproduces the unbroken one bit for bit."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from ..finite import NonFiniteError, first_nonfinite, json_safe
from ..profile import PROFILER
from .checkpoint import load_checkpoint, save_adapter_atomic, save_checkpoint


class MetricsLog:
    """Append-only JSON lines.  On resume from step S the lines of steps > S (written after
    the checkpoint, then lost with the crash) are dropped first, so the file reads as if
    the run had never stopped."""

    def __init__(self, path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if int(json.loads(line)["step"]) <= resume_step:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by the crash
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)
        self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        """One line of valid JSON: a NaN or Inf is written as null."""
        self._f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class PeriodicEval:
    """Eval every `every` updates: `run_eval()` -> {"eval_loss", and optionally "eval_ppl",
    "accuracy"}, one metrics line per eval; with `best_dir` the adapter of the lowest eval
    loss so far is kept there; with `patience` > 0 the run stops after that many evals in a
    row without a lower loss.  Its counters travel in checkpoints (state_dict)."""

    def __init__(self, every: int, run_eval, patience: int = 0, best_dir=None):
        self.every, self.run_eval, self.patience, self.best_dir = int(every), run_eval, int(patience), best_dir
        self.best, self.best_step, self.since_best = math.inf, None, 0

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def __call__(self, trainer, metrics) -> bool:
        """Evaluate now; True when the run should stop early."""
        result = self.run_eval()
        loss = result["eval_loss"]
        if loss < self.best:
            self.best, self.best_step, self.since_best = loss, trainer.step_count, 0
            if self.best_dir is not None and trainer.is_writer:
                save_adapter_atomic(trainer.model, self.best_dir)
        else:
            self.since_best += 1
        if metrics is not None:
            record = {"step": trainer.step_count, **{k: result[k] for k in ("eval_loss", "eval_ppl", "accuracy")
                                                     if k in result},
                      "best_eval_loss": self.best, "best_step": self.best_step}
            metrics.write(record)
        return self.patience > 0 and self.since_best >= self.patience

    def state_dict(self) -> dict:
        return {"best": None if math.isinf(self.best) else self.best, "best_step": self.best_step,
                "since_best": self.since_best}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.best = math.inf if state.get("best") is None else float(state["best"])
            self.best_step, self.since_best = state.get("best_step"), int(state.get("since_best", 0))


def training_state(trainer, loader, elapsed: float, run: dict | None, periodic_eval=None) -> dict:
    state = trainer.state_dict()
    state["data"] = loader.state_dict()
    step = getattr(trainer.model, "step", None)
    state["rng"] = {"model_step": step if isinstance(step, int) else None}
    state["elapsed"] = elapsed
    state["run"] = run or {}
    if periodic_eval is not None:
        state["periodic_eval"] = periodic_eval.state_dict()
    return state


def restore(trainer, loader, checkpoint) -> dict:
    """Load adapter, optimizer, trainer, data position and RNG from `checkpoint`; returns
    its state dict."""
    state, opt = load_checkpoint(checkpoint)
    trainer.model.load_adapter(checkpoint)
    bad = first_nonfinite(trainer.model.parameters())
    if bad is not None:
        raise NonFiniteError(f"{checkpoint}: adapter tensor {bad} holds NaN or Inf values")
    try:  # the messages name what is wrong; the checkpoint is what the user can act on
        trainer.load_state_dict(state, opt)
        loader.load_state_dict(state["data"])
    except ValueError as e:
        raise ValueError(f"{checkpoint}: {e}") from None
    model_step = state.get("rng", {}).get("model_step")
    if model_step is not None:
        trainer.model.step = int(model_step)
    return state


def computed_tokens(batch, world_size: int, micro_size: int) -> int:
    """Token positions the step computes for a global batch, padding included: each rank's
    micro-batches are as wide as their own longest row (rounded to the batch's multiple)."""
    return sum(mb[0].size for rank in range(world_size)
               for mb in batch.shard(rank, world_size).micro_batches(micro_size))


def fit(trainer, loader, total_steps: int, micro_size: int, out_dir=None, save_every: int = 0,
        keep_last: int | None = None, metrics: MetricsLog | None = None, progress=None,
        should_stop=lambda: False, run: dict | None = None, elapsed: float = 0.0,
        periodic_eval: PeriodicEval | None = None) -> dict:
    """Train until trainer.step_count == total_steps or should_stop() turns true (checked
    between updates; a checkpoint is then written) or periodic_eval asks to stop early.
    Returns {"status": "done"|"stopped"|"early_stopped", "step", "elapsed"}."""
    writer = trainer.is_writer and out_dir is not None
    last_saved = None

    def save():
        nonlocal last_saved
        if writer and last_saved != trainer.step_count:
            save_checkpoint(out_dir, trainer.model, training_state(trainer, loader, elapsed, run, periodic_eval),
                            trainer.optimizer_state(), keep_last=keep_last)
        last_saved = trainer.step_count

    status = "done"
    while trainer.step_count < total_steps:
        if should_stop():
            status = "stopped"
            break
        t0 = time.perf_counter()
        with PROFILER.step():  # a no-op unless --trace/--plot turned the profiler on
            batch = loader.next_batch()
            local = batch.shard(trainer.rank, trainer.world_size)
            loss = trainer.train_step(local.micro_batches(micro_size))
        dt = time.perf_counter() - t0
        elapsed += dt
        tokens, padded = int(batch.attention_mask.sum()), computed_tokens(batch, trainer.world_size, micro_size)
        if metrics is not None and trainer.is_writer:
            metrics.write({"step": trainer.step_count, "loss": loss, "lr": trainer.last_lr, "tokens": tokens,
                           "padded_tokens": padded, "tokens_per_s": tokens / dt if dt else None,
                           "grad_norm": trainer.last_grad_norm, "elapsed": elapsed})
        if progress is not None:
            progress.update(1)
            progress.set_postfix(f"loss={loss:.4f}" + (f" tok/s={tokens / dt:.0f}" if dt else "")
                                 + f" (real tokens; padding {1 - tokens / padded:.0%})")
        early = periodic_eval is not None and periodic_eval.due(trainer.step_count) \
            and periodic_eval(trainer, metrics)
        if save_every and trainer.step_count % save_every == 0:
            save()
        if early:
            status = "early_stopped"
            break
    save()
    return {"status": status, "step": trainer.step_count, "elapsed": elapsed}


class _DecodeTicks:
    """generate()'s per-token progress as a heartbeat of an examples counter: the postfix
    names the token, and update(0) lets a log line out when one is due."""

    def __init__(self, progress, limit: int):
        self.progress, self.limit, self.token = progress, limit, 0

    def update(self, n: int = 1) -> None:
        self.token += n
        self.progress.set_postfix(f"token {self.token}/{self.limit}")
        self.progress.update(0)


def exact_match(model, pairs, max_new_tokens: int | None = None, progress=None, batch_size: int = 32) -> tuple:
    """Greedy generation for each (prompt_ids, expected_text), `batch_size` prompts decoded
    together (KV cache; a batch ends when every row has stopped); returns (accuracy,
    outputs).  `progress` advances by one per finished prompt and shows the token decoded."""
    tok = model.tokenizer
    eos = tok.eos_token_id
    stop = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    hits, outputs = 0, []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        # An exact answer ends (stop token) right after its own tokens: a little slack for
        # another tokenization of the same text, no more (generation is the slow part).
        limits = [max_new_tokens or len(tok.encode(expected)) + 2 for _, expected in chunk]
        ticks = _DecodeTicks(progress, max(limits)) if progress is not None else None
        outs = model.generate([p for p, _ in chunk], max_new_tokens=max(limits), temperature=0.0, stop_ids=stop,
                              progress=ticks)
        for (_, expected), out, n in zip(chunk, outs, limits):
            text = tok.decode(out[:n], skip_special_tokens=True).strip()
            outputs.append(text)
            hits += text == expected.strip()
        if progress is not None:
            progress.update(len(chunk))
    return (hits / len(pairs) if pairs else float("nan")), outputs
