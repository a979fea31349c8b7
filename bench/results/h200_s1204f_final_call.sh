#!/usr/bin/env bash
# closing figures on main: row-wise kernels (GPU GB/s); Qwen3-0.6B step of 7693da0 (before prep/CE) and main,
# HF fp32 first in main's processes, two processes; Qwen3-4B checkpointing forced (HF fp32 first) and the automatic choice
set -uo pipefail
cd "$(dirname "$0")/.."
cp .whlref/*.whl .whl/
rm -rf /tmp/site /tmp/site_old
bash bench/run_gpu_host.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/site_old .trial/old > /tmp/build_old.log 2>&1 || { tail -20 /tmp/build_old.log; exit 1; }
timeout 60 python3 bench/gpu_train_throughput.py --shape smollm2-135m --batch 4 --seq 64 --steps 2 --modes gpu > /dev/null 2>&1
QLORA_EXT_ROWWISE_BENCH="N=4096,C=1024,H=16,D=128,OUT=3072,IN=1024" timeout 120 python3 -m pytest -q -p no:cacheprovider \
  bench/bench_gpu_rowwise.py --benchmark-enable --benchmark-only --benchmark-json=$OUT/final_rowwise.json > /tmp/r.log 2>&1 || tail -5 /tmp/r.log
PYTHONPATH= python3 -c "
import json
for b in json.load(open('$OUT/final_rowwise.json'))['benchmarks']:
    e=b['extra_info']; print(b['name'], round(b['stats']['median']*1e3,3), 'ms', round(e.get('GB_per_s',0)), round(e.get('gpu_GB_per_s',0)), 'GB/s')"
(cd .trial/old && PYTHONPATH=/tmp/site_old:/tmp/site timeout 150 python3 bench/gpu_train_throughput.py --shape qwen3-0.6b --steps 3 --profile --modes gpu --json $OUT/final_small_before.jsonl > /tmp/old.log 2>&1) || tail -5 /tmp/old.log
for rep in 1 2; do
  timeout 150 python3 bench/gpu_train_throughput.py --shape qwen3-0.6b --steps 3 --profile --modes hf-fp32,gpu --json $OUT/final_small.jsonl > /tmp/small.log 2>&1 || tail -5 /tmp/small.log
done
timeout 220 python3 bench/gpu_train_throughput.py --shape qwen3-4b --steps 2 --checkpointing --modes hf-fp32,gpu --json $OUT/final_large.jsonl > /tmp/large.log 2>&1 || tail -5 /tmp/large.log
timeout 100 python3 bench/gpu_train_throughput.py --shape qwen3-4b --steps 2 --modes gpu --json $OUT/final_large_auto.jsonl > /tmp/auto.log 2>&1 || tail -5 /tmp/auto.log
PYTHONPATH= python3 -c "
import json,glob
for f in sorted(glob.glob('$OUT/final_*.jsonl')):
    for l in open(f):
        d=json.loads(l); ph={p['phase']:round(p['ms_per_step'],2) for p in d.get('profile',{}).get('phases',[])}
        print(f.split('/')[-1], d['mode'], d.get('gradient_checkpointing'), round(d['tokens_per_s']), round(d['step_s']*1e3,1), d.get('peak_gpu_gib'), {k: ph.get(k) for k in ('gemm_f32.main','attention_bwd.prep','cross_entropy.rows','rmsnorm.forward','rmsnorm.backward','rope.apply','nf4.dequant','add.axpy')})"
