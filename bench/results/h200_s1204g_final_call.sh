#!/usr/bin/env bash
# closing figures of the session on lead: attention fwd+bwd vs SDPA fp32 (T 1024, 4096); Qwen3-0.6B gpu vs HF fp32
# (HF first, two processes); Qwen3-4B checkpointing forced vs HF fp32 (HF first); Qwen3-4B automatic choice
set -uo pipefail
cd "$(dirname "$0")/.."
cp .whlref/*.whl .whl/
rm -rf /tmp/site /tmp/site_L
bash bench/run_gpu_host.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/site_L .trial/lead > /tmp/build_L.log 2>&1 || { tail -20 /tmp/build_L.log; exit 1; }
export PYTHONPATH=/tmp/site_L:/tmp/site
cd .trial/lead
timeout 60 python3 bench/gpu_train_throughput.py --shape smollm2-135m --batch 4 --seq 64 --steps 2 --modes gpu > /dev/null 2>&1
for T in 1024 4096; do
  for k in torch_sdpa "attention_fwd_bwd_gpu and one"; do
    QLORA_EXT_GPU_BENCH="B=1,T=$T,HQ=32,HKV=8,D=128,C=2560,V=151936,DOC=256" timeout 90 python3 -m pytest -q -p no:cacheprovider \
      bench/bench_gpu_ops.py -k "$k" --benchmark-enable --benchmark-only --benchmark-json=/tmp/a.json > /tmp/a.log 2>&1 || tail -3 /tmp/a.log
    PYTHONPATH= python3 -c "
import json; b=json.load(open('/tmp/a.json'))['benchmarks'][0]; print('attention', '$k'.split()[0], $T, round(b['stats']['median']*1e3,3), round(b['stats']['min']*1e3,3))" | tee -a $OUT/final_g.log
  done
done
for rep in 1 2; do
  timeout 150 python3 bench/gpu_train_throughput.py --shape qwen3-0.6b --steps 3 --profile --modes hf-fp32,gpu --json $OUT/final_g_small.jsonl > /tmp/small.log 2>&1 || tail -5 /tmp/small.log
done
timeout 220 python3 bench/gpu_train_throughput.py --shape qwen3-4b --steps 2 --checkpointing --modes hf-fp32,gpu --json $OUT/final_g_large.jsonl > /tmp/large.log 2>&1 || tail -5 /tmp/large.log
timeout 100 python3 bench/gpu_train_throughput.py --shape qwen3-4b --steps 2 --modes gpu --json $OUT/final_g_large_auto.jsonl > /tmp/auto.log 2>&1 || tail -5 /tmp/auto.log
PYTHONPATH= python3 -c "
import json,glob
for f in sorted(glob.glob('$OUT/final_g_*.jsonl')):
    for l in open(f):
        d=json.loads(l); ph={p['phase']:round(p['ms_per_step'],2) for p in d.get('profile',{}).get('phases',[])}
        print(f.split('/')[-1], d['mode'], d.get('gradient_checkpointing'), round(d['tokens_per_s']), round(d['step_s']*1e3,1), d.get('peak_gpu_gib'), {k: ph.get(k) for k in ('gemm_f32.main','attention_bwd.dkdv','attention_fwd.forward','attention_bwd.dq','attention_bwd.prep','swiglu.forward','swiglu.backward')})" | tee -a $OUT/final_g.log
