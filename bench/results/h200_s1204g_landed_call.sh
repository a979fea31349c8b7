#!/usr/bin/env bash
# main as landed (e4fbb87): Qwen3-0.6B gpu vs HF fp32 (HF first), one process, step profile
set -uo pipefail
cd "$(dirname "$0")/.."
cp .whlref/*.whl .whl/
rm -rf /tmp/site
bash bench/run_gpu_host.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
git log --oneline -1 2>/dev/null || true
timeout 60 python3 bench/gpu_train_throughput.py --shape smollm2-135m --batch 4 --seq 64 --steps 2 --modes gpu > /dev/null 2>&1
timeout 150 python3 bench/gpu_train_throughput.py --shape qwen3-0.6b --steps 3 --profile --modes hf-fp32,gpu --json $OUT/landed_small.jsonl > /tmp/small.log 2>&1 || tail -5 /tmp/small.log
PYTHONPATH= python3 -c "
import json
for l in open('$OUT/landed_small.jsonl'):
    d=json.loads(l); ph={p['phase']:round(p['ms_per_step'],2) for p in d.get('profile',{}).get('phases',[])}
    print(d['mode'], round(d['tokens_per_s']), round(d['step_s']*1e3,1), d.get('peak_gpu_gib'), {k: ph.get(k) for k in ('gemm_f32.main','attention_bwd.dkdv','swiglu.forward','swiglu.backward')})"
