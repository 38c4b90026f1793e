#!/usr/bin/env bash
# The GPU check of one device session. By default, in about 6.5 minutes on one H100/H200: the gpu-marked
# tests, ZeRO-3 + HiFT on one GPU against stage 0 (tests/test_gpu_zero3.py, under a minute), the LLaMA-2-7B
# headline at 1 x 512 (bandwidth probe, resident, two slots, one slot, each against its lower bound, with a
# trace) and the 1.1B offload benchmark over one whole cycle with a trace (tests + headline + offload took
# 320 s on an H200, 2026-11-26). The rest is a second call: STAGES="headline compare kernels"
# HEADLINE_BATCHES=4 (4 x 512 with checkpointing, then the comparison and the kernel benchmark). Writes to
# OUTDIR: gpu_check.log (everything printed), one JSON per benchmark stage (offload.json, headline.json,
# compare.json, kernels.json) and the gzipped profiler traces in trace/.
#
#   here:        bash benchmarks/gpu_wheels.sh            # once: the wheels the GPU image lacks, into .whl/
#   device tool: run(command="bash benchmarks/gpu_check.sh $OUT", carry=[".whl"], timeout_s=480)
#   rehearsal:   TINY=1 bash benchmarks/gpu_check.sh /tmp/gpu_check    # tiny sizes, on a CPU too
#
# STAGES=measure is the early call of issue 25 (one process per part, every set-up of a part in that one
# process, ABBA blocks of whole cycles, CUDA events per step; benchmarks/paired.py), about 200 s in all:
#   measure_1b.json         1.1B 4x512 bf16, bare optimizer: hift-triton vs hift-offload-triton (2 slots),
#                           2 blocks each after a warm-up cycle, then a traced run of 6 steps
#   measure_1b_engine.json  the same shape through hift_ds.initialize (ds_configs/hift.json): resident, offloaded
#                           with DeepSpeed's synchronized throughput timer (its default), offloaded without (the fix)
#   measure_7b.json         LLaMA-2-7B 1x512 uncapped (~90 + ~19 GiB, both on one H200): resident vs offloaded,
#                           MEASURE_7B_BLOCKS blocks each (default 2; 1 if time is short), per-group compute and
#                           copy times and the two lower bounds, a traced run of 3 steps
#   device tool: run(command="STAGES=measure BUDGET=330 bash benchmarks/gpu_check.sh $OUT", carry=[".whl"],
#                    timeout_s=360)     (part limits 75 + 90 + 180 s, capped by what is left of BUDGET)
#   rehearsal:   TINY=1 STAGES=measure bash benchmarks/gpu_check.sh /tmp/measure    # tiny model, CPU set-ups
# Its output goes to the log and to stdout (the tail of a device call shows it).
#
# STAGES=final is issue 25's closing call, after the chunked store (about 360 s on one H200, within BUDGET, 400 by
# default for this stage; each part under its own limit, results printed as measured, JSON in OUTDIR):
#   gpu tests               pytest -m gpu tests/test_gpu.py (chunked copies bitwise equal to resident training with
#                           1-3 slots, exact pinned bytes; 46 s for the 55 tests before, about 70 s now)
#   final_1b.json           1.1B 4x512 bare optimizer: hift-triton, hift-offload-triton (2 slots, the default) and
#                           hift-offload-triton-1slot, FINAL_BLOCKS (6) whole-cycle blocks each, ABBA, no trace
#   final_1b_engine.json    the same shape through hift_ds.initialize: ds-hift vs ds-hift-offload, FINAL_BLOCKS each
#   final_7b_fit.json       LLaMA-2-7B hift-offload-triton under a 24 GiB allocator cap: 1x512, then 4x512 with
#                           gradient checkpointing; NVML device peak against 24 GiB, pinned bytes against the state
#   final_7b.json           LLaMA-2-7B uncapped, one process: hift-triton vs hift-offload-triton at 1x512,
#                           FINAL_7B_BLOCKS (4) blocks each, with the three bounds (one-step lead, longer lead, the
#                           store's pipeline modelled); then 4x512 with checkpointing on the same copies, 2 blocks each
#   zero3                   the ZeRO-3 one-GPU check, only if 45 s of the budget are left
#   device tool: run(command="STAGES=final bash benchmarks/gpu_check.sh $OUT", carry=[".whl"], timeout_s=430)
#   rehearsal:   TINY=1 STAGES=final bash benchmarks/gpu_check.sh /tmp/final    # tiny model, CPU set-ups
#
# Stages run in the order STAGES gives (default "tests zero3 headline offload"; also: compare, kernels, measure), each
# under its own time limit and the remaining BUDGET (seconds, 440 by default), so a slow stage costs the
# later ones, not the whole call; a stage's failure does not stop the rest. HEADLINE_BATCHES picks the 7B
# runs ("1", "4" = 4 x 512 with checkpointing, or "1,4"); OFFLOAD_MODES the 1.1B modes.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/gpu_check.log"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TORCH_CUDA_ARCH_LIST=9.0  # DeepSpeed's op builder: not 9.0a
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # the device machine has no network; nothing here downloads
# This checkout's hift_ds, whatever else is installed: a script in benchmarks/ has benchmarks/ (not the root) first
# on its path, and hift_ds.kernels now imports from the root, so the editable install below may not happen.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
budget=${BUDGET:-$([ "${STAGES:-}" = final ] && echo 400 || echo 440)}
start=$SECONDS

note() { echo "=== $* ($(date -u +%H:%M:%S), ${SECONDS}s)" | tee -a "$log"; }
stage() {  # stage NAME LIMIT_S COMMAND...: run COMMAND under min(LIMIT_S, time left), output to the log
  local name=$1 limit=$2 left=$((budget - (SECONDS - start)))
  shift 2
  if [ "$left" -lt 20 ]; then note "$name: skipped, ${left}s of the budget left"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  note "$name: start, limit ${limit}s: $*"
  timeout "$limit" "$@" >>"$log" 2>&1
  note "$name: exit status $? (124 = out of time)"
}
stage_shown() {  # as stage, with the output on stdout too (as it is measured; library log lines only in the log)
  local name=$1 limit=$2 left=$((budget - (SECONDS - start)))
  shift 2
  if [ "$left" -lt 20 ]; then note "$name: skipped, ${left}s of the budget left"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  note "$name: start, limit ${limit}s: $*"
  timeout "$limit" "$@" 2>&1 | tee -a "$log" | grep --line-buffered -v -E '^(USDT:|\[20[0-9][0-9]-)' 
  note "$name: exit status ${PIPESTATUS[0]} (124 = out of time)"
}

note "set-up"
if [ -d .whl ] && ! python3 -c "import pydantic, deepspeed" >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import hift_ds.kernels" >/dev/null 2>&1 || python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$log" 2>&1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
  git log -1 --format='commit %H %cd' 2>/dev/null; } >>"$log" 2>&1

if [ "${TINY:-0}" = 1 ]; then
  size=(--model tiny --batch-size 2 --seq-len 32)
  steps=(--steps 2 --warmup 1 --sync-steps 1)
  kernel_args=(--cpu-smoke)
  size7=(--model tiny --batch-size 1 --seq-len 32)  # the 7B part's protocol, on the tiny model
  pair=hift,hift-offload probe=(--probe-gib 0.01)  # set-ups a CPU runs (the Triton ones need CUDA)
  pair3=hift,hift-offload,hift-offload-noprefetch also=2x32c
  fit=(--model tiny --setup hift-offload --shapes 1x32,2x32c)
else  # 24 steps: one whole cycle of llama-1b's 24 groups (a step's cost depends on its group's depth)
  size=(--model llama-1b --batch-size 4 --seq-len 512)
  steps=(--steps 24 --warmup 3 --sync-steps 3)
  kernel_args=()
  size7=(--model llama-7b --batch-size 1 --seq-len 512)
  pair=hift-triton,hift-offload-triton probe=(--probe-gib 1)
  pair3=hift-triton,hift-offload-triton,hift-offload-triton-1slot also=4x512c
  fit=(--model llama-7b --setup hift-offload-triton --max-memory-gib 24 --shapes 1x512,4x512c)
fi

for s in ${STAGES:-tests zero3 headline offload}; do
  case $s in
    tests) stage "gpu tests" 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py ;;
    zero3) stage "zero3 gpu check" 120 python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_gpu_zero3.py ;;
    offload) stage "offload 1.1B" 170 python3 benchmarks/offload.py "${size[@]}" "${steps[@]}" \
      --modes "${OFFLOAD_MODES:-fpft,hift-triton,hift-offload-triton,hift-offload-triton-1slot}" \
      --trace "$out/trace" --trace-steps 3 --json "$out/offload.json" ;;
    headline) stage "headline 7B" 200 python3 benchmarks/offload.py --headline-only --headline-steps 4 \
      --headline-batches "${HEADLINE_BATCHES:-1}" --trace "$out/trace" --trace-steps 2 --json "$out/headline.json" ;;
    compare) stage "compare" 150 python3 benchmarks/compare.py "${size[@]}" "${steps[@]}" \
      --modes fpft,badam,badam-50,torchao-offload,torchao-offload-grads,hift-offload-triton --json "$out/compare.json" ;;
    kernels) stage "kernels" 60 python3 benchmarks/update_kernels.py "${kernel_args[@]}" --json "$out/kernels.json" ;;
    measure)
      stage_shown "measure 1.1B bare" 75 python3 benchmarks/offload.py "${size[@]}" "${probe[@]}" --paired "$pair" \
        --blocks "${MEASURE_BLOCKS:-2}" --trace "$out/trace" --trace-steps 6 --json "$out/measure_1b.json"
      stage_shown "measure 1.1B engine" 90 python3 benchmarks/offload.py "${size[@]}" "${probe[@]}" \
        --paired ds-hift,ds-hift-offload-synctimer,ds-hift-offload --blocks "${MEASURE_BLOCKS:-2}" \
        --trace "$out/trace" --trace-steps 4 --json "$out/measure_1b_engine.json"
      stage_shown "measure 7B" 180 python3 benchmarks/offload.py "${size7[@]}" "${probe[@]}" --paired "$pair" \
        --blocks "${MEASURE_7B_BLOCKS:-2}" --trace "$out/trace" --trace-steps 3 --json "$out/measure_7b.json" ;;
    final)
      stage_shown "gpu tests" 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
        --junitxml "$out/gpu_tests.xml"
      stage_shown "final 1.1B bare" 80 python3 benchmarks/offload.py "${size[@]}" "${probe[@]}" --paired "$pair3" \
        --blocks "${FINAL_BLOCKS:-6}" --json "$out/final_1b.json"
      stage_shown "final 1.1B engine" 70 python3 benchmarks/offload.py "${size[@]}" "${probe[@]}" \
        --paired ds-hift,ds-hift-offload --blocks "${FINAL_BLOCKS:-6}" --json "$out/final_1b_engine.json"
      stage_shown "final 7B fit" 90 python3 benchmarks/fit.py "${fit[@]}" --json "$out/final_7b_fit.json"
      stage_shown "final 7B paired" 150 python3 benchmarks/offload.py "${size7[@]}" "${probe[@]}" --paired "$pair" \
        --blocks "${FINAL_7B_BLOCKS:-4}" --also "$also" --also-blocks 2 --json "$out/final_7b.json"
      if [ $((budget - (SECONDS - start))) -ge 45 ]; then
        stage "zero3 gpu check" 60 python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_gpu_zero3.py
      else note "zero3 gpu check: skipped, $((budget - (SECONDS - start)))s of the budget left (needs 45)"; fi ;;
    *) note "unknown stage $s (tests headline offload compare kernels zero3 measure final)" ;;
  esac
done
note "done"
