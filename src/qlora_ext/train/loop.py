"""The training loop around a Trainer: global batches from a DataLoader, this rank's slice
in micro-batches, metrics lines, periodic atomic checkpoints, a stop flag (Ctrl-C), resume.

What a checkpoint's trainer_state.json holds (besides the Trainer's own state): the data
position, the model's dropout step counter (its only randomness), elapsed seconds and the
run's settings, so that a resumed run reproduces the unbroken one bit for bit."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..finite import NonFiniteError, first_nonfinite, json_safe
from ..profile import PROFILER
from .checkpoint import load_checkpoint, save_checkpoint


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


def training_state(trainer, loader, elapsed: float, run: dict | None) -> dict:
    state = trainer.state_dict()
    state["data"] = loader.state_dict()
    step = getattr(trainer.model, "step", None)
    state["rng"] = {"model_step": step if isinstance(step, int) else None}
    state["elapsed"] = elapsed
    state["run"] = run or {}
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


def fit(trainer, loader, total_steps: int, micro_size: int, out_dir=None, save_every: int = 0,
        keep_last: int | None = None, metrics: MetricsLog | None = None, progress=None,
        should_stop=lambda: False, run: dict | None = None, elapsed: float = 0.0) -> dict:
    """Train until trainer.step_count == total_steps or should_stop() turns true (checked
    between updates; a checkpoint is then written).  Returns {"status": "done"|"stopped",
    "step", "elapsed", "last_checkpoint"}."""
    writer = trainer.is_writer and out_dir is not None
    last_saved = None

    def save():
        nonlocal last_saved
        if writer and last_saved != trainer.step_count:
            save_checkpoint(out_dir, trainer.model, training_state(trainer, loader, elapsed, run),
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
        tokens = int(batch.attention_mask.sum())
        if metrics is not None and trainer.is_writer:
            metrics.write({"step": trainer.step_count, "loss": loss, "lr": trainer.last_lr, "tokens": tokens,
                           "tokens_per_s": tokens / dt if dt else None, "grad_norm": trainer.last_grad_norm,
                           "elapsed": elapsed})
        if progress is not None:
            progress.update(1)
            progress.set_postfix(f"loss={loss:.4f} tok/s={tokens / dt:.0f}" if dt else f"loss={loss:.4f}")
        if save_every and trainer.step_count % save_every == 0:
            save()
    save()
    return {"status": status, "step": trainer.step_count, "elapsed": elapsed}


def exact_match(model, pairs, max_new_tokens: int | None = None, progress=None) -> tuple:
    """Greedy generation for each (prompt_ids, expected_text); returns (accuracy, outputs)."""
    tok = model.tokenizer
    eos = tok.eos_token_id
    stop = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    hits, outputs = 0, []
    for prompt_ids, expected in pairs:
        # An exact answer ends (stop token) right after its own tokens: a little slack for
        # another tokenization of the same text, no more (generation is the slow part).
        n = max_new_tokens or len(tok.encode(expected)) + 2
        out = model.generate(prompt_ids, max_new_tokens=n, temperature=0.0, stop_ids=stop)
        text = tok.decode(out, skip_special_tokens=True).strip()
        outputs.append(text)
        hits += text == expected.strip()
        if progress is not None:
            progress.update(1)
    return (hits / len(pairs) if pairs else float("nan")), outputs
