#!/usr/bin/env bash
# The README's Quickstart as a newcomer runs it: a fresh venv with `pip install -e .` only (the core
# dependencies: no torch, no extras), then the main demo (experiments/randomwalks_ppo.py, which runs
# the SFT script first) end to end with its lengths cut down, then the files the README promises.
# Run by .ci/run; locally: `bash .ci/quickstart.sh [DIR]` (DIR: where the venv and runs go; default a
# new temporary directory). Takes about 1 minute of pip (cached wheels) and 1-2 of CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=${1:-$(mktemp -d)}
mkdir -p "$work"
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q -e "$repo"
if "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
  echo "quickstart: torch is importable in the clean venv; the check needs an environment without it" >&2
  exit 1
fi
runs="$work/runs"
# The tests' compile-only XLA flags (tests/conftest.py): this checks the install, not the speed.
export XLA_FLAGS="--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
"$py" experiments/randomwalks_ppo.py --sft_num_steps 20 --ppo.total_steps 2 --ppo.save_every 2 --no-progress \
  --out_dir "$runs/randomwalks_ppo" --sft_dir "$runs/randomwalks_sft" 2>&1 | tee "$work/demo.log"
# A rerun skips the finished SFT stage and says so (only the stage's loader: the PPO would just repeat).
(cd experiments && "$py" -c "
import sys, sft_policy
sft_policy.load_sft_policy(sys.argv[1], 'randomwalks_sft', {}, False, 'graph')
" "$runs/randomwalks_sft") 2>&1 | tee -a "$work/demo.log"
"$py" - "$runs" "$work/demo.log" <<'EOF'
import glob, json, os, sys

runs, log = sys.argv[1], open(sys.argv[2]).read()
promised = {  # README, Quickstart: what the demo writes
    "randomwalks_sft": ["config.json", "metrics.jsonl", "events.out.tfevents.*", "model/config.json",
                        "model/model.safetensors", "model/tokenizer.json", "sft.png", "summary.json"],
    "randomwalks_ppo": ["config.json", "checkpoints/2", "run_0/metrics.jsonl", "run_0/events.out.tfevents.*",
                        "run_0/policy/config.json", "run_0/policy/model.safetensors", "run_0/policy/tokenizer.json",
                        "randomwalks_ppo.png", "results.md", "summary.json", "sweep_summary.json"],
}
missing = [f"{d}/{p}" for d, paths in promised.items() for p in paths if not glob.glob(os.path.join(runs, d, p))]
sft = json.load(open(os.path.join(runs, "randomwalks_sft", "summary.json")))
problems = missing and [f"missing: {', '.join(missing)}"] or []
if "skipped" not in sft.get("hf_load_check", "") or not sft["hf_max_abs_logit_diff"] <= 1e-3:
    problems.append(f"SFT summary: HF load check {sft.get('hf_load_check')!r}, diff {sft.get('hf_max_abs_logit_diff')}")
for needle in ("PyTorch was not found", "Traceback"):
    if needle in log:
        problems.append(f"the output shows {needle!r}")
if "SFT: using the finished SFT run" not in log:
    problems.append("the rerun did not say it skips the finished SFT stage")
if problems:
    sys.exit("quickstart: " + "; ".join(problems))
print(f"quickstart: the demo ran without torch and wrote every promised file under {runs}")
EOF
