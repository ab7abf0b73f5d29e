#!/usr/bin/env bash
# The GPU suite: one command for a lent NVIDIA GPU, about 9 minutes, one markdown report.
#
#   bash benchmarks/gpu_suite.sh [--out DIR]      # on the GPU machine: DIR/gpu_report.md (default $OUT or gpu_report)
#   bash benchmarks/gpu_suite.sh --smoke --out D  # tiny cases on the CPU (CI runs this so the script cannot rot)
#
# Sections (each with its own time limit, so one failure leaves the others' figures):
#   1. the device: nvidia-smi, jax's devices and versions
#   2. GPU-relevant tests on the GPU: sampling and training (conftest pins the CPU unless
#      JAX_PLATFORMS is set, so it is set here)
#   3. sampling: jaxrlhf tok/s and roofline fraction at GPT-2 124M and Llama-shaped 150M, float32 and bf16
#   4. sweeps: 1, 8 and 64 randomwalks PPO runs as one program
#   5. one PPO iteration at GPT-2 124M (jaxrlhf's fused step; the PyTorch loop beside it), with
#      the per-phase FLOP table; one GRPO iteration (4 prompts x 4); then PPO with a rank-8 LoRA
#      policy on both sides
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0
out="${OUT:-gpu_report}"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --out) out="$2"; shift ;;
    *) echo "usage: $0 [--smoke] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
report="$out/gpu_report.md"
export PYTHONUNBUFFERED=1

if [ "$smoke" = 1 ]; then
  export JAX_PLATFORMS=cpu
  tests="tests/test_core_hand_worked.py"
  sampling_args=(--cases tiny-b128-n10 --reps 1 --roofline)  # with torch here: its path is checked too
  sampling_bf16=(--cases tiny-b128-n10 --reps 1 --no-torch --dtype bfloat16)
  sweep_args=(--quick)
  ppo_args=(--quick)
  grpo_args=(--quick --algorithm grpo --split True --minibatches 1)  # one minibatch: XLA counts the whole update
  ppo_lora_args=(--quick --lora_rank 4 --iters 1 --split True --out "$out/ppo_lora")
  limit=600
  test_limit=600
else
  export JAX_PLATFORMS=cuda
  tests="tests/test_sampling.py tests/test_training.py tests/test_sweep.py"
  sampling_args=(--cases gpt2-124m-b16-n64 gpt2-124m-b64-n64 llama-150m-b64-n64 --reps 3 --no-torch --roofline)
  sampling_bf16=(--cases gpt2-124m-b64-n64 llama-150m-b64-n64 --reps 3 --no-torch --dtype bfloat16)
  sweep_args=(--runs 1 8 64 --reps 3)
  ppo_args=(--iters 3)
  grpo_args=(--iters 3 --algorithm grpo)
  ppo_lora_args=(--iters 1 --lora_rank 8)
  limit=65       # per benchmark section: 60 + 120 + 6 x 65 s = 9.5 minutes at most
  test_limit=120
fi

section() {  # section TITLE SECONDS COMMAND...: run it, put its output (tail) in the report
  local title="$1" seconds="$2"; shift 2
  echo "== $title" >&2
  local start=$SECONDS log
  log=$(timeout "$seconds" "$@" 2>&1); local rc=$?
  {
    echo "## $title"
    echo
    echo "\`$*\` (exit $rc, $((SECONDS - start)) s)"
    echo
    echo '```'
    echo "$log" | grep -v -e 'Warning' -e '^ *warn' | tail -n 60
    echo '```'
    echo
  } >> "$report"
}

{
  echo "# jaxrlhf GPU suite ($([ "$smoke" = 1 ] && echo smoke, CPU || echo GPU))"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
} > "$report"

section "Device" 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; python3 -c "import jax; print(jax.__version__, jax.devices())"'
section "Tests on the device" "$test_limit" python3 -m pytest -q -x -p no:cacheprovider $tests
section "Sampling, float32" "$limit" python3 benchmarks/sampling.py "${sampling_args[@]}"
section "Sampling, bfloat16" "$limit" python3 benchmarks/sampling.py "${sampling_bf16[@]}"
section "Sweeps" "$limit" python3 benchmarks/sweep.py "${sweep_args[@]}"
section "PPO iteration" "$limit" python3 benchmarks/ppo_step.py "${ppo_args[@]}"
section "GRPO iteration" "$limit" python3 benchmarks/ppo_step.py "${grpo_args[@]}"
section "PPO iteration, LoRA" "$limit" python3 benchmarks/ppo_step.py "${ppo_lora_args[@]}"

echo "report: $report" >&2
