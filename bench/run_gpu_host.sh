#!/usr/bin/env bash
# The GPU-host session behind BENCHMARKS.md's GPU figures: sets up the offline host (Vulkan
# loader from .gl/, wheels from .whl/, see ../shared/scripts/gpu-host-bundle.sh), builds the
# package, then runs the stages named on the command line, logging under $OUT.
#   bash bench/run_gpu_host.sh small     Qwen3-0.6B shape: every placement + HF; attention vs SDPA
#   bash bench/run_gpu_host.sh large     Qwen3-4B shape: every placement + HF
#   bash bench/run_gpu_host.sh small-split   Qwen3-0.6B shape: the split placement only, lanes 2 then 1
#   bash bench/run_gpu_host.sh dist      MPI: all-reduce time, 1 -> 2 ranks on CPU, 2 ranks sharing the GPU
#   bash bench/run_gpu_host.sh final     the closing figures: gpu + HF fp32 at 0.6B and at 4B with recompute
#                                        forced, the gpu placement at 4B with the automatic choice
#   bash bench/run_gpu_host.sh overheads host work per small step (SmolLM2 shape), attention on packed rows
#   bash bench/run_gpu_host.sh engine    the gpu and split placements on the one layer program, generation
#   bash bench/run_gpu_host.sh real-tokens   the bundled task on real tokens, padded vs grouped (needs
#                                        SmolLM2's tokenizer files in .trial/smoltok: bench_real_tokens.py --prepare)
#   bash bench/run_gpu_host.sh gpu       the gpu placement (GpuModel + Trainer)
#                                        and HF fp32/bf16 at 0.6B and 4B shapes, attention vs SDPA, the auto choice
# The HF references run first in each process: run after our placement in the same process,
# HF's Qwen3-0.6B step measured 0.52 s against 0.41 s first (BENCHMARKS.md, fifth session of
# 2026-12-04); ours measured the same either way.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ ! -d /tmp/site/qlora_ext ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/site . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -c "import qlora_ext as q; print(q.cpu_features(), q.adapter_info())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for stage in "$@"; do
  case $stage in
    small)
      python3 bench/gpu_train_throughput.py --shape qwen3-0.6b --steps 3 --profile \
        --modes hf-bf16,hf-fp32,gpu,split --json "$OUT/small.jsonl" 2>&1 | tee "$OUT/small.log"
      for T in 1024 4096; do
        QLORA_EXT_GPU_BENCH="B=1,T=$T,HQ=32,HKV=8,D=128,C=2560,V=151936,DOC=256" python3 -m pytest -q -p no:cacheprovider \
          bench/bench_gpu_ops.py -k attention --benchmark-enable --benchmark-only --benchmark-json="$OUT/attn_T$T.json" 2>&1 | tail -15
      done ;;
    small-split)
      # two lanes, then one pass (the default) for comparison; a trace of each
      for lanes in 2 1; do
        python3 bench/gpu_train_throughput.py --shape qwen3-0.6b --steps 2 --profile --lanes $lanes \
          --trace-dir "$OUT" --modes split --json "$OUT/small_split.jsonl" 2>&1 | tee -a "$OUT/small_split.log"
      done ;;
    dist)
      # the mpich wheel's launcher and library (pip --target leaves the wheel's lib/ out, and
      # mpi4py would otherwise load the image's Open MPI)
      mpilib=$(python3 -c "
import glob, zipfile
z = zipfile.ZipFile(glob.glob('.whl/mpich-*.whl')[0])
libs = [n for n in z.namelist() if '/data/lib/' in n]
z.extractall('/tmp/mpich', libs)
print('/tmp/mpich/' + libs[0].split('/data/lib/')[0] + '/data/lib')")
      chmod -R u+rwx /tmp/mpich
      export PATH=/tmp/site/bin:$PATH MPI4PY_MPIABI=mpich LD_LIBRARY_PATH=$mpilib:$mpilib/mpich:${LD_LIBRARY_PATH:-}
      ls -la $mpilib | head -5
      mpiexec -n 2 python3 -c "from mpi4py import MPI; print(MPI.Get_library_version()[:30], MPI.COMM_WORLD.size)"
      python3 bench/make_checkpoint.py /tmp/q06 --shape qwen3-0.6b > /dev/null
      python3 -m pytest -q -p no:cacheprovider bench/bench_distributed.py -k allreduce --benchmark-enable \
        --benchmark-json="$OUT/dist_allreduce.json" 2>&1 | tail -3
      for dev in cpu gpu; do
        QLORA_EXT_BENCH_DIST_MODEL=/tmp/q06 QLORA_EXT_BENCH_DIST_THREADS=4 QLORA_EXT_BENCH_DIST_DEVICE=$dev \
          python3 -m pytest -q -p no:cacheprovider bench/bench_distributed.py -k scaling --benchmark-enable \
          --benchmark-json="$OUT/dist_scaling_$dev.json" 2>&1 | tail -3
      done ;;
    gpu)
      python3 bench/gpu_train_throughput.py --shape qwen3-0.6b --steps 5 --profile \
        --modes hf-bf16,hf-fp32,gpu --json "$OUT/gpu_small.jsonl" 2>&1 | tee "$OUT/gpu_small.log" | grep -v "^{"
      python3 bench/gpu_train_throughput.py --shape qwen3-4b --steps 3 --checkpointing --profile \
        --modes hf-bf16,hf-fp32,gpu --json "$OUT/gpu_large.jsonl" 2>&1 | tee "$OUT/gpu_large.log" | grep -v "^{"
      for T in 1024 4096; do
        QLORA_EXT_GPU_BENCH="B=1,T=$T,HQ=32,HKV=8,D=128,C=2560,V=151936,DOC=256" python3 -m pytest -q -p no:cacheprovider \
          bench/bench_gpu_ops.py -k attention --benchmark-enable --benchmark-only --benchmark-json="$OUT/attn_T$T.json" 2>&1 | tail -6
      done
      # what load_model(placement="auto") chooses here, and why (free memory from nvidia-smi)
      python3 bench/make_checkpoint.py /tmp/q06 --shape qwen3-0.6b > /dev/null
      python3 -c "
import qlora_ext as qx
for shape in ((4, 1024), (64, 4096)):
    m = qx.load_model('/tmp/q06', placement='auto', batch_shape=shape, progress=False)
    print('auto', shape, '->', m.placement, '|', m.placement_reason)
" 2>&1 | tee "$OUT/auto.log" ;;
    engine)
      # issue "One engine": the gpu and split placements on the one layer program,
      # HF fp32 in the same run, the 4B shape with checkpointing, generation of 32 x 64 tokens
      timeout 170 python3 bench/gpu_train_throughput.py --shape qwen3-0.6b --steps 3 \
        --modes hf-fp32,gpu --json "$OUT/engine_small.jsonl" 2>&1 | tee "$OUT/engine_small.log" | grep -v "^{"
      timeout 100 python3 bench/gpu_generate.py --shape qwen3-0.6b --modes gpu --sampling greedy,sampled --json "$OUT/engine_generate.jsonl"
      timeout 150 python3 bench/gpu_train_throughput.py --shape qwen3-4b --steps 2 --checkpointing \
        --modes gpu --json "$OUT/engine_large.jsonl" 2>&1 | tee "$OUT/engine_large.log" | grep -v "^{"
      timeout 100 python3 bench/gpu_train_throughput.py --shape qwen3-0.6b --steps 1 \
        --modes split --json "$OUT/engine_split.jsonl" 2>&1 | tee "$OUT/engine_split.log" | grep -v "^{" ;;
    final)
      # the session's closing figures (#16, #18): gpu placement and HF fp32 at 0.6B and at the 4B
      # shape with checkpointing forced; the 4B shape with the automatic choice
      timeout 200 python3 bench/gpu_train_throughput.py --shape qwen3-0.6b --steps 3 --profile \
        --modes hf-fp32,gpu --json "$OUT/final_small.jsonl" 2>&1 | tee "$OUT/final_small.log" | grep -v "^{"
      timeout 200 python3 bench/gpu_train_throughput.py --shape qwen3-4b --steps 2 --checkpointing \
        --modes hf-fp32,gpu --json "$OUT/final_large.jsonl" 2>&1 | tee "$OUT/final_large.log" | grep -v "^{"
      timeout 120 python3 bench/gpu_train_throughput.py --shape qwen3-4b --steps 2 \
        --modes gpu --json "$OUT/final_large_auto.jsonl" 2>&1 | tee "$OUT/final_large_auto.log" | grep -v "^{"
      ;;
    overheads)
      # host work per step where the GPU's work is small: SmolLM2-135M's shape at 4 x 64 and
      # 4 x 256 (the bundled task's padded and grouped widths), and the attention on one
      # document against packed rows of 256-token documents at T 1024 and 4096
      for T in 64 256; do
        timeout 60 python3 bench/gpu_train_throughput.py --shape smollm2-135m --batch 4 --seq $T --steps 5 --profile \
          --modes gpu --json "$OUT/overheads.jsonl" 2>&1 | grep -v "^{" | tail -9
      done
      for T in 1024 4096; do
        QLORA_EXT_GPU_BENCH="B=1,T=$T,HQ=32,HKV=8,D=128,C=2560,V=151936,DOC=256" timeout 80 python3 -m pytest -q \
          -p no:cacheprovider bench/bench_gpu_ops.py -k attention --benchmark-enable --benchmark-only \
          --benchmark-json="$OUT/attn_T$T.json" 2>&1 | tail -8
      done ;;
    real-tokens)
      python3 bench/make_checkpoint.py /tmp/smol --shape smollm2-135m > /dev/null && cp .trial/smoltok/* /tmp/smol/
      QLORA_EXT_BENCH_DEVICE=gpu QLORA_EXT_BENCH_MODEL=/tmp/smol timeout 200 python3 -m pytest -q -p no:cacheprovider \
        bench/bench_real_tokens.py --benchmark-enable --benchmark-only --benchmark-json="$OUT/real_tokens_gpu.json" 2>&1 | tail -4 ;;
    large)
      python3 bench/gpu_train_throughput.py --shape qwen3-4b --steps 2 --checkpointing --profile \
        --modes hf-bf16,hf-fp32,gpu,split-stream --json "$OUT/large.jsonl" 2>&1 | tee "$OUT/large.log" ;;
  esac
done
