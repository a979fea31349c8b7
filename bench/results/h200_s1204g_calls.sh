# ===== call 1: .trial/run_u1.sh
#!/usr/bin/env bash
# attention scores as fma chains (lead) vs main: attention fwd+bwd alternating + SDPA; 0.6B step profile; HF fp32 first in lead process
set -uo pipefail
cd "$(dirname "$0")/.."
cp .whlref/*.whl .whl/
rm -rf /tmp/site /tmp/site_L
bash bench/run_gpu_host.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/site_L .trial/lead > /tmp/build_L.log 2>&1 || { tail -20 /tmp/build_L.log; exit 1; }
L=/tmp/site_L:/tmp/site
timeout 60 env PYTHONPATH=/tmp/site python3 bench/gpu_train_throughput.py --shape smollm2-135m --batch 4 --seq 64 --steps 2 --modes gpu > /dev/null 2>&1
for T in 1024 4096; do
  QLORA_EXT_GPU_BENCH="B=1,T=$T,HQ=32,HKV=8,D=128,C=2560,V=151936,DOC=256" PYTHONPATH=/tmp/site timeout 90 python3 -m pytest -q -p no:cacheprovider \
      bench/bench_gpu_ops.py -k "torch_sdpa" --benchmark-enable --benchmark-only --benchmark-json=/tmp/sdpa.json > /tmp/a.log 2>&1 || tail -3 /tmp/a.log
  PYTHONPATH= python3 -c "
import json; b=json.load(open('/tmp/sdpa.json'))['benchmarks'][0]; print('sdpa', $T, round(b['stats']['median']*1e3,3), round(b['stats']['min']*1e3,3))" | tee -a $OUT/attn_fma.log
  for rep in 1 2; do
    for v in main lead; do
      site=/tmp/site; tree=.; [ $v = lead ] && { site=$L; tree=.trial/lead; }
      (cd $tree && QLORA_EXT_GPU_BENCH="B=1,T=$T,HQ=32,HKV=8,D=128,C=2560,V=151936,DOC=256" PYTHONPATH=$site timeout 90 python3 -m pytest -q -p no:cacheprovider \
        bench/bench_gpu_ops.py -k "attention_fwd_bwd_gpu and one" --benchmark-enable --benchmark-only --benchmark-json=/tmp/a.json > /tmp/a.log 2>&1) || tail -3 /tmp/a.log
      PYTHONPATH= python3 -c "
import json; b=json.load(open('/tmp/a.json'))['benchmarks'][0]; print('$v', $T, $rep, round(b['stats']['median']*1e3,3), round(b['stats']['min']*1e3,3))" | tee -a $OUT/attn_fma.log
    done
  done
done
for v in main lead; do
  site=/tmp/site; tree=.; modes=gpu; [ $v = lead ] && { site=$L; tree=.trial/lead; modes=hf-fp32,gpu; }
  (cd $tree && PYTHONPATH=$site timeout 150 python3 bench/gpu_train_throughput.py --shape qwen3-0.6b --steps 3 --profile --modes $modes --json $OUT/step_$v.jsonl > /tmp/s.log 2>&1) || tail -5 /tmp/s.log
  PYTHONPATH= python3 -c "
import json
for l in open('$OUT/step_$v.jsonl'):
    d=json.loads(l); ph={p['phase']:round(p['ms_per_step'],2) for p in d.get('profile',{}).get('phases',[])}
    print('$v', d['mode'], round(d['tokens_per_s']), round(d['step_s']*1e3,1), d['peak_gpu_gib'], {k: ph.get(k) for k in ('gemm_f32.main','attention_bwd.dkdv','attention_fwd.forward','attention_bwd.dq','attention_bwd.prep')})"
done
# ===== call 2: .trial/run_u2.sh
#!/usr/bin/env bash
# prep as PL=4 chunks, swiglu vec4 (lead) vs main: 0.6B step profiles (HF fp32 first in lead's process);
# the driver's shader cache of lead's run carved for SASS (registers, opcode mix)
set -uo pipefail
cd "$(dirname "$0")/.."
cp .whlref/*.whl .whl/
rm -rf /tmp/site /tmp/site_L /tmp/glc
bash bench/run_gpu_host.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/site_L .trial/lead > /tmp/build_L.log 2>&1 || { tail -20 /tmp/build_L.log; exit 1; }
L=/tmp/site_L:/tmp/site
timeout 60 env PYTHONPATH=/tmp/site python3 bench/gpu_train_throughput.py --shape smollm2-135m --batch 4 --seq 64 --steps 2 --modes gpu > /dev/null 2>&1
ls -la ~/.cache/nvidia ~/.nv 2>&1 | head -5
for v in main lead; do
  site=/tmp/site; tree=.; modes=gpu; [ $v = lead ] && { site=$L; tree=.trial/lead; modes=hf-fp32,gpu; }
  (cd $tree && __GL_SHADER_DISK_CACHE=1 __GL_SHADER_DISK_CACHE_PATH=/tmp/glc_$v __GL_SHADER_DISK_CACHE_SKIP_CLEANUP=1 \
     PYTHONPATH=$site timeout 150 python3 bench/gpu_train_throughput.py --shape qwen3-0.6b --steps 3 --profile --modes $modes --json $OUT/step_$v.jsonl > /tmp/s.log 2>&1) || tail -5 /tmp/s.log
  PYTHONPATH= python3 -c "
import json
for l in open('$OUT/step_$v.jsonl'):
    d=json.loads(l); ph={p['phase']:round(p['ms_per_step'],2) for p in d.get('profile',{}).get('phases',[])}
    print('$v', d['mode'], round(d['tokens_per_s']), round(d['step_s']*1e3,1), d['peak_gpu_gib'], {k: ph.get(k) for k in ('gemm_f32.main','attention_bwd.dkdv','attention_fwd.forward','attention_bwd.prep','swiglu.forward','swiglu.backward')})"
done
python3 .trial/sass_probe.py /tmp/glc_lead /tmp/sass > $OUT/sass.log 2>&1; tail -c 9000 $OUT/sass.log
tar czf $OUT/sass.tgz -C /tmp sass 2>/dev/null; ls -la /tmp/glc_lead | head
# ===== call 3: .trial/run_u3.sh
#!/usr/bin/env bash
# lead (prep staged whole, 8 rows) vs the same with 16 prep rows (QLORA_EXT_SHADERS copy): 0.6B step profiles;
# the driver's shader cache (~/.cache/nvidia) carved for SASS
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf /tmp/site /tmp/site_L /root/.cache/nvidia
bash bench/run_gpu_host.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/site_L .trial/lead > /tmp/build_L.log 2>&1 || { tail -20 /tmp/build_L.log; exit 1; }
L=/tmp/site_L:/tmp/site
cd .trial/lead
timeout 60 env PYTHONPATH=$L python3 bench/gpu_train_throughput.py --shape smollm2-135m --batch 4 --seq 64 --steps 2 --modes gpu > /dev/null 2>&1
for v in lead prep16 lead prep16; do
  sd=""; [ $v = prep16 ] && sd=$PWD/../shaders_prep16
  QLORA_EXT_SHADERS=$sd PYTHONPATH=$L timeout 150 python3 bench/gpu_train_throughput.py --shape qwen3-0.6b --steps 3 --profile --modes gpu --json $OUT/step_u3.jsonl > /tmp/s.log 2>&1 || tail -5 /tmp/s.log
  PYTHONPATH= python3 -c "
import json
d=json.loads(open('$OUT/step_u3.jsonl').readlines()[-1]); ph={p['phase']:round(p['ms_per_step'],2) for p in d.get('profile',{}).get('phases',[])}
print('$v', d['mode'], round(d['tokens_per_s']), round(d['step_s']*1e3,1), {k: ph.get(k) for k in ('gemm_f32.main','attention_bwd.dkdv','attention_bwd.prep','swiglu.forward','swiglu.backward')})"
done
find /root/.cache/nvidia -type f | head; du -sh /root/.cache/nvidia
python3 ../sass_probe.py /root/.cache/nvidia /tmp/sass > $OUT/sass.log 2>&1; tail -c 7000 $OUT/sass.log
tar czf $OUT/sass.tgz -C /tmp sass 2>/dev/null
# ===== call 4: .trial/run_u4.sh
#!/usr/bin/env bash
# attention tilings with 64- and 128-thread workgroups in the 0.6B step (lead + prep16 copy), per-kernel profile
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf /tmp/site /tmp/site_L
bash bench/run_gpu_host.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/site_L .trial/lead > /tmp/build_L.log 2>&1 || { tail -20 /tmp/build_L.log; exit 1; }
L=/tmp/site_L:/tmp/site
cd .trial/lead
export QLORA_EXT_SHADERS=$PWD/../shaders_prep16
timeout 60 env PYTHONPATH=$L python3 bench/gpu_train_throughput.py --shape smollm2-135m --batch 4 --seq 64 --steps 2 --modes gpu > /dev/null 2>&1
for tl in default 32,64,4,4 64,32,4,4 32,32,4,4 16,64,4,4 32,64,4,4,4 64,64,4,4,8; do
  env $( [ $tl = default ] || echo QLORA_EXT_ATTN_TILES=$tl ) PYTHONPATH=$L timeout 150 python3 bench/gpu_train_throughput.py --shape qwen3-0.6b --steps 3 --profile --modes gpu --json $OUT/step_u4.jsonl > /tmp/s.log 2>&1 || tail -5 /tmp/s.log
  PYTHONPATH= python3 -c "
import json
d=json.loads(open('$OUT/step_u4.jsonl').readlines()[-1]); ph={p['phase']:round(p['ms_per_step'],2) for p in d.get('profile',{}).get('phases',[])}
print('$tl', round(d['tokens_per_s']), round(d['step_s']*1e3,1), {k: ph.get(k) for k in ('attention_fwd.forward','attention_bwd.dkdv','attention_bwd.dq','attention_bwd.prep','attention_group_sum.group_sum')})" | tee -a $OUT/u4.log
done
# ===== call 5: .trial/run_u5.sh
#!/usr/bin/env bash
# 0.6B GEMMs: current vs 128x256 tiles (8x16 a thread) and 128x128; the workgroup order grouped 16 M tiles (QLORA_EXT_SHADERS copy);
# 0.6B step lead vs HF fp32 (HF first), two processes
set -uo pipefail
cd "$(dirname "$0")/.."
cp .whlref/*.whl .whl/
rm -rf /tmp/site /tmp/site_L
bash bench/run_gpu_host.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/site_L .trial/lead > /tmp/build_L.log 2>&1 || { tail -20 /tmp/build_L.log; exit 1; }
L=/tmp/site_L:/tmp/site
cd .trial/lead
timeout 60 env PYTHONPATH=$L python3 bench/gpu_train_throughput.py --shape smollm2-135m --batch 4 --seq 64 --steps 2 --modes gpu > /dev/null 2>&1
PYTHONPATH=$L timeout 200 python3 bench/bench_gemm_ceiling.py --shapes qwen3-0.6b --reps 5 --no-cublas --variants "current;w=16,16,8,16,8;a=16,16,8,8,8" --json $OUT/gemm_tiles.json > /tmp/g.log 2>&1 || tail -5 /tmp/g.log
QLORA_EXT_SHADERS=$PWD/../shaders_swz PYTHONPATH=$L timeout 150 python3 bench/bench_gemm_ceiling.py --shapes qwen3-0.6b --reps 5 --no-cublas --variants "current" --json $OUT/gemm_swz.json > /tmp/g2.log 2>&1 || tail -5 /tmp/g2.log
PYTHONPATH=$L python3 bench/bench_gemm_ceiling.py --table $OUT/gemm_tiles.json | tee $OUT/gemm_tables.txt
PYTHONPATH=$L python3 bench/bench_gemm_ceiling.py --table $OUT/gemm_swz.json | tee -a $OUT/gemm_tables.txt
for rep in 1 2; do
  PYTHONPATH=$L timeout 150 python3 bench/gpu_train_throughput.py --shape qwen3-0.6b --steps 3 --modes hf-fp32,gpu --json $OUT/step_u5.jsonl > /tmp/s.log 2>&1 || tail -5 /tmp/s.log
done
PYTHONPATH= python3 -c "
import json
for l in open('$OUT/step_u5.jsonl'):
    d=json.loads(l); print(d['mode'], round(d['tokens_per_s']), round(d['step_s']*1e3,1), d['peak_gpu_gib'])"
# ===== call 6: .trial/run_u6.sh
#!/usr/bin/env bash
# lead (dx 128x128 tiles, grouped logits order) vs old (its parent): 0.6B step profiles; HF fp32 first in lead's processes
set -uo pipefail
cd "$(dirname "$0")/.."
cp .whlref/*.whl .whl/
rm -rf /tmp/site /tmp/site_L /tmp/site_O
bash bench/run_gpu_host.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/site_L .trial/lead > /tmp/build_L.log 2>&1 || { tail -20 /tmp/build_L.log; exit 1; }
python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/site_O .trial/old > /tmp/build_O.log 2>&1 || { tail -20 /tmp/build_O.log; exit 1; }
timeout 60 env PYTHONPATH=/tmp/site_L:/tmp/site python3 .trial/lead/bench/gpu_train_throughput.py --shape smollm2-135m --batch 4 --seq 64 --steps 2 --modes gpu > /dev/null 2>&1
for v in old lead old lead; do
  site=/tmp/site_O:/tmp/site; modes=gpu; [ $v = lead ] && { site=/tmp/site_L:/tmp/site; modes=hf-fp32,gpu; }
  (cd .trial/$v && PYTHONPATH=$site timeout 150 python3 bench/gpu_train_throughput.py --shape qwen3-0.6b --steps 3 --profile --modes $modes --json $OUT/step_u6_$v.jsonl > /tmp/s.log 2>&1) || tail -5 /tmp/s.log
  PYTHONPATH= python3 -c "
import json
for l in open('$OUT/step_u6_$v.jsonl').readlines()[-2 if '$v'=='lead' else -1:]:
    d=json.loads(l); ph={p['phase']:round(p['ms_per_step'],2) for p in d.get('profile',{}).get('phases',[])}
    print('$v', d['mode'], round(d['tokens_per_s']), round(d['step_s']*1e3,1), d['peak_gpu_gib'], {k: ph.get(k) for k in ('gemm_f32.main','attention_bwd.dkdv','attention_fwd.forward')})" | tee -a $OUT/u6.log
done
