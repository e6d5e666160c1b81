#!/usr/bin/env bash
# The GPU machine's steps, in one device call (carry [".gpu"], see ../shared/gpu/README.md):
#   bash scripts/gpu_run.sh STEP...   with steps: build test sanitize bench bench-all bench-ab vllm e2e
#   profile serve serve-auto decode-diag ncu row-quant
# Logs and JSON go to $OUT (or out/gpu when run elsewhere).
# GPU_CALL_S: the seconds the device call leaves this script (its limit less a margin). Each step
# then runs in a process of its own under timeout of what is left, so one that overruns loses
# only itself (what it wrote under $OUT stays and comes back), and a step is skipped when less is
# left than it usually takes on the H100 (usual_s; GPU_STEP_S="bench=300 e2e=600" overrides).
set -uo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
out=${OUT:-out/gpu}
mkdir -p "$out"
source .gpu/setup.sh || exit 1
if [ -z "${GPU_RUN_ONE:-}" ]; then
  echo "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
fi
# The results' names carry the GPU model (gemm_h100.json, gemm_h200.json): the device tool has
# lent H100s and H200s, whose memory bandwidths differ by ~1.4x.
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'H[0-9]{3}|A100|L40S?' \
  | head -1 | tr '[:upper:]' '[:lower:]')
gpu=${gpu:-gpu}
status=0
# The 32-layer Llama-3-8B-shaped checkpoints of the formats given (comma-separated) in /tmp/e2e,
# made where missing; kept there for later calls on the same machine.
prepare() {
  python3 benchmarks/bench_e2e.py --workdir /tmp/e2e --layers "${E2E_LAYERS:-32}" --formats "$1" \
    --prepare-only
}
serve_args="--max-model-len 2048 --attention-backend TRITON_ATTN --gpu-memory-utilization 0.85"
usual_s() {
  local pair seconds=0
  for pair in build=60 test=480 sanitize=200 vllm=330 bench=120 bench-all=420 bench-ab=300 \
    e2e=200 profile=300 serve=420 serve-auto=300 ncu=240 decode-diag=240 row-quant=150 \
    ${GPU_STEP_S:-}; do
    [ "${pair%%=*}" = "$1" ] && seconds=${pair#*=}
  done
  echo "$seconds"
}
run_step() {
  local step=$1
  case $step in
    build)
      python3 -m pip install -q --no-build-isolation --no-deps --no-index \
        -C cmake.define.QQQ_CUDA_ARCHS=90a -C build-dir=build/gpu -e . 2>&1 | tail -20
      python3 -c "from vllm_qqq import _C, ops; print('extension:', _C.__file__, ops.kernels_available())" || exit 1
      ;;
    test)
      python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/test_kernels_gpu.py tests/test_pipeline.py 2>&1 \
        | tee "$out/test_gpu.log" | tail -25 || status=1
      ;;
    sanitize)
      compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider \
        -m gpu tests/test_kernels_gpu.py -k "small_partial_n or wide_partial_n or (quant_kernel and 128) or (every_wgmma_tile and True) or small_m_kernels_either_way or ((silu_mul_quant_kernel or add_rms_norm_quant_kernel) and not 1024 and not rule)" 2>&1 \
        | tee "$out/sanitizer.log" | tail -8 || status=1
      ;;
    bench)
      python3 benchmarks/bench_gemm.py --ms "${BENCH_MS:-1,16,64,128,256,1024,4096,8192}" \
        --shapes "${BENCH_SHAPES:-qkv,o,gate_up,down}" --impls ${BENCH_IMPLS:-qqq_channel,qqq_g128,qqq_g128_fp16,qqq_channel_mma,fp16,w8a8_cutlass,cutlass_w4a8_fp8} \
        --repeat "${BENCH_REPEAT:-1}" --json "$out/gemm_quick.json" 2>&1 | tee "$out/bench_quick.log" | tail -45
      ;;
    bench-all)
      python3 benchmarks/bench_gemm.py --ms "${BENCH_MS:-1,16,64,128,256,1024,4096,8192}" \
        --impls qqq_channel,qqq_g128,qqq_g128_fp16,fp16,w8a8_cutlass,marlin_w4a16_g128,machete_w4a16_g128,marlin_w4a8_channel,marlin_w4a8_g128,cutlass_w4a8_fp8 \
        --json "$out/gemm_$gpu.json" 2>&1 \
        | tee "$out/bench_all.log" | tail -45
      ;;
    row-quant)
      # Inductor's fused quantization kernels under its reduction heuristic and the plugin's.
      python3 benchmarks/bench_row_quant.py --ms "${ROW_QUANT_MS:-1,16,64,256,2048,8192}" 2>&1 \
        | tee "$out/row_quant.log" | grep -E "device|M="
      ;;
    vllm)
      python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/test_vllm_gpu.py 2>&1 \
        | tee "$out/test_vllm_gpu.log" | tail -15 || status=1
      ;;
    e2e)
      # Checkpoints and results persist in /tmp/e2e, so a run split over device calls on one
      # machine (E2E_FORMATS per call) adds up to one JSON (--append).
      mkdir -p /tmp/e2e
      python3 benchmarks/bench_e2e.py --workdir /tmp/e2e --layers "${E2E_LAYERS:-32}" \
        --formats "${E2E_FORMATS:-fp16,w8a8,w4a16,qqq_channel,qqq_g128}" \
        --batches "${E2E_BATCHES:-1,16,64,256}" \
        --json /tmp/e2e/e2e_$gpu.json --append 2>&1 | tee -a /tmp/e2e/bench_e2e.log | tail -30
      cp /tmp/e2e/e2e_$gpu.json /tmp/e2e/bench_e2e.log "$out/"
      ;;
    profile)
      # PROFILE_FORMATS: formats, "+kernel-quant" after a QQQ one runs it with
      # VLLM_QQQ_COMPILED_QUANT=0 (the quantization kernel instead of PyTorch ops for Inductor),
      # "+fused" with VLLM_QQQ_FUSED_QUANT=1 (our norm / SiLU-and-mul + quantization kernels),
      # "+unfused" with 0 (Inductor's kernels for both); otherwise the default ("auto": the SiLU
      # pair fused on sm_90+).
      runs=${PROFILE_FORMATS:-fp16 qqq_channel}
      formats=$(echo $runs | tr ' ' '\n' | sed 's/+.*//' | sort -u | paste -sd,)
      prepare "$formats"
      for run in $runs; do
        fmt=${run%%+*}
        q=$([ $fmt = fp16 ] || echo "--quantization qqq")
        echo "##### $run" | tee -a "$out/profile.log"
        VLLM_QQQ_COMPILED_QUANT=$([ $run = $fmt+kernel-quant ] && echo 0 || echo 1) \
          VLLM_QQQ_FUSED_QUANT=$(case $run in *+fused) echo 1;; *+unfused) echo 0;; *) echo auto;; esac) \
          python3 benchmarks/profile_decode.py /tmp/e2e/llama3-8b-shaped-$fmt $q \
          --batches "${PROFILE_BATCHES:-1,16}" --json "$out/profile_${run/+/-}.json" 2>&1 \
          | grep -E -A26 "^(prefill|host ops|decode step)" | tee -a "$out/profile.log"
      done
      ;;
    serve)
      # vllm serve with vLLM's defaults: --quantization qqq under 64 clients x 60 s (~7 min on a
      # fresh machine with the checkpoint's preparation; serve-auto in the next call on the
      # same warm machine, as both do not fit one 10-minute call).
      prepare qqq_channel
      python3 benchmarks/serve_load.py /tmp/e2e/llama3-8b-shaped-qqq_channel --quantization qqq \
        --concurrency 64 --duration 60 --serve-args "$serve_args" \
        --json "$out/serve_qqq_channel.json" --log /tmp/serve_flag.log 2>&1 | tail -22 || status=1
      tail -c 20000 /tmp/serve_flag.log > "$out/serve_qqq_channel.log"
      ;;
    serve-auto)
      # The g128 checkpoint served without the flag (auto-detection) under the same load.
      prepare qqq_g128
      python3 benchmarks/serve_load.py /tmp/e2e/llama3-8b-shaped-qqq_g128 \
        --concurrency 64 --duration "${SERVE_AUTO_S:-60}" --serve-args "$serve_args" \
        --json "$out/serve_qqq_g128_autodetect.json" --log /tmp/serve_auto.log 2>&1 | tail -22 || status=1
      tail -c 20000 /tmp/serve_auto.log > "$out/serve_qqq_g128_autodetect.log"
      ;;
    ncu)
      # Nsight Compute on single launches (NCU_RUNS: impl:shape:M:kernel-regex, space separated):
      # speed of light, memory and warp-stall sections, one report per run in ncu.log; NCU_EXTRA:
      # more ncu options (e.g. --section SourceCounters for the stall sites).
      sections="--section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats --section InstructionStats --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio"
      for run in ${NCU_RUNS:-qqq_channel:gate_up:4096:w4a8 qqq_channel:gate_up:128:w4a8 qqq_channel:gate_up:1:w4a8 qqq_channel:qkv:1:w4a8|quant w8a8_cutlass:gate_up:4096:cutlass|Kernel}; do
        IFS=: read -r impl shape m regex <<< "$run"
        echo "##### $impl $shape M=$m" | tee -a "$out/ncu.log"
        (cd benchmarks && ncu --clock-control none --kernel-name "regex:$regex" --launch-skip 2 \
          --launch-count $([[ $regex == *quant* ]] && echo 2 || echo 1) $sections ${NCU_EXTRA:-} \
          python3 profile_gemm.py --impl $impl --shape $shape --m $m) >> "$out/ncu.log" 2>&1 || status=1
      done
      grep -E "^#####|Duration|Throughput|Pipe|Stall|Issued|Eligible|Registers|Achieved Occ|Bank|issue_stalled" "$out/ncu.log" | head -150
      ;;
    decode-diag)
      for mode in "" --eager; do
        python3 benchmarks/bench_e2e.py --workdir /tmp/e2e --layers 2 --formats fp16,qqq_channel \
          --batches 1 $mode 2>&1 | tee -a "$out/decode_diag.log" | grep -vE "^\s*$" | tail -12
      done
      ;;
    bench-ab)
      # This tree's kernels against another revision's on one machine, the bench run in turns
      # (clocks drift by a few % over a call; one bench after the other is no A/B). Make the other
      # revision's files first: git archive REV CMakeLists.txt pyproject.toml csrc vllm_qqq
      # offline benchmarks/bench_gemm.py > ab_base.tar. Both are built in place by CMake (not
      # with the build step, whose editable install would shadow the base tree's package).
      mkdir -p /tmp/ab_base && tar -xf ab_base.tar -C /tmp/ab_base || exit 1
      inplace() {
        cmake -S "$1" -B "$1/build/ab" -G Ninja -DQQQ_CUDA_ARCHS=90a -DCMAKE_BUILD_TYPE=Release \
          -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" > "$1/build/ab.log" 2>&1 &&
          cmake --build "$1/build/ab" >> "$1/build/ab.log" 2>&1 && cp "$1"/build/ab/_C*.so "$1/vllm_qqq/"
      }
      mkdir -p build /tmp/ab_base/build
      inplace . & inplace /tmp/ab_base & wait
      for tree in . /tmp/ab_base; do
        (cd $tree && python3 -c "import vllm_qqq._C as c, os
assert c.__file__.startswith(os.getcwd()), c.__file__") || exit 1
      done
      for round in $(seq ${AB_ROUNDS:-2}); do
        for tree in . /tmp/ab_base; do
          echo "-- $([ $tree = . ] && echo this tree || echo base) round $round" | tee -a "$out/bench_ab.log"
          (cd $tree && python3 benchmarks/bench_gemm.py --ms "${BENCH_MS:-128,256,1024,4096,8192}" \
            --shapes "${BENCH_SHAPES:-qkv,o,gate_up,down}" \
            --impls ${BENCH_IMPLS:-qqq_channel,qqq_g128,w8a8_cutlass} 2>&1) \
            | grep "^  " | tee -a "$out/bench_ab.log"
        done
      done
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
}
if [ -n "${GPU_RUN_ONE:-}" ]; then
  run_step "$1"
  exit $status
fi
start=$SECONDS
for step in "$@"; do
  echo "=== $step ($(date +%T))"
  if [ -z "${GPU_CALL_S:-}" ]; then
    run_step "$step"
    continue
  fi
  left=$((GPU_CALL_S - (SECONDS - start)))
  need=$(usual_s "$step")
  if [ "$left" -lt "$need" ]; then
    echo "skipped: $left s left, $step usually takes $need s"
    status=1
    continue
  fi
  GPU_RUN_ONE=1 timeout -k 5 "$left" bash "$self" "$step"
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "stopped: $step ran past the $left s left"
  fi
  if [ $rc -ne 0 ]; then
    status=1
    [ "$step" = build ] && exit 1  # the steps after it need the extension
  fi
done
exit $status
