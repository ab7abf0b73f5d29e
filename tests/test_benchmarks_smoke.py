"""The benchmark scripts run end to end in their --quick mode and print their result lines.

Slow: each compiles a jitted step and runs a PyTorch baseline (about 35 s of CPU time each for
ppo_step.py; on the shared 2-core machine that was 2 minutes of wall time).
"""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str, timeout: int = 900) -> str:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as the benchmarks are meant to run
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_ppo_step_quick():
    out = _run("ppo_step.py", "--quick")
    match = re.search(r"^ratio \(torch / jaxrlhf\) per PPO iteration: (\d+\.\d+)x$", out, re.MULTILINE)
    assert match, out[-4000:]
    assert float(match.group(1)) > 0
    assert re.search(r"^iteration \(fused jit\)\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+x$", out, re.MULTILINE), out
    assert "load average" in out and "compile" in out


@pytest.mark.slow
def test_ppo_step_quick_lora_and_flop_table(tmp_path):
    # A LoRA policy on both sides (the script exits if their trainable counts differ) and the split
    # phases' FLOP table, also written as JSON and markdown.
    out = _run("ppo_step.py", "--quick", "--lora_rank", "4", "--split", "True", "--out", str(tmp_path))
    counts = re.search(r"^trainable policy parameters: jaxrlhf ([\d,]+), torch ([\d,]+)$", out, re.MULTILINE)
    assert counts and counts.group(1) == counts.group(2), out[-4000:]
    rows = re.findall(
        r"^(rollout|experience|update|fused) +(\d+\.\d+) +(\d+\.\d+) +(xla|shapes) +\d+\.\d+ +\d+\.\d+ +\d+\.\d%$",
        out,
        re.MULTILINE,
    )
    assert [r[0] for r in rows] == ["rollout", "experience", "update", "fused"], out[-4000:]
    # No loop over matrix products in the experience program: XLA's count and the shape count agree.
    xla, shapes = float(rows[1][1]), float(rows[1][2])
    assert abs(xla - shapes) <= 0.1 * shapes, rows
    # The tiny model's decode step can be within the timing noise of a loaded machine: nan then.
    assert re.search(r"^decode step: (\d+\.\d+|nan) ms, .* MB read .* of it reached", out, re.MULTILINE), out[-4000:]
    record = json.loads((tmp_path / "ppo_step.json").read_text())
    assert record["config"]["lora_rank"] == 4
    assert [row["program"] for row in record["flops"]["programs"]] == ["rollout", "experience", "update", "fused"]
    assert "| decode step ms |" in (tmp_path / "ppo_step.md").read_text()


def test_ppo_step_refuses_lora_on_fused_qkv():
    # GPT-2's c_attn holds q, k, v in one matrix: peft's adapter there is not jaxrlhf's q, k, v adapters.
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "ppo_step.py"), "--lora_rank", "4", "--lora_targets", "q"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "c_attn" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_sampling_quick():
    # The tiny-model case only: the 124M cases are for benchmark runs, not for CI.
    out = _run("sampling.py", "--cases", "tiny-b128-n10", "--reps", "1")
    # One row per case, ending in "<ratio>x <compile s>".
    rows = re.findall(r"^\S+\s+\d+M\s+\d+\s+\d+\s+(\d+\.\d+)x\s+\d+\.\d+$", out, re.MULTILINE)
    assert rows, out[-4000:]


@pytest.mark.slow
def test_sweep_quick():
    out = _run("sweep.py", "--quick")
    rows = re.findall(r"^sweep R=(\d)\s+(\d+\.\d+)\s+(\d+\.\d+)x", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["1", "2"], out[-4000:]
    assert re.search(
        r"^2 runs as one sweep: \d+\.\d+x the time of one run, \d+\.\d+x the throughput", out, re.MULTILINE
    )
    assert "load average" in out and "matrix-product peak" in out


@pytest.mark.slow
def test_scan_layers_small():
    out = _run("scan_layers.py", "--layers", "1", "--batch", "1", "--length", "8")
    rows = re.findall(r"^\| 1 \| ([a-z_ +-]+) \| (\d+\.\d+) \| (\d+\.\d+) \| (\d+\.\d+) \|$", out, re.MULTILINE)
    assert [r[0] for r in rows] == [
        "per-layer",
        "per-layer + remat full",
        "scan",
        "scan + remat full",
        "scan + remat dots_saveable",
    ], out[-4000:]


def test_benchmark_flags_are_checked_before_any_work():
    # tyro rejects an unknown case name or flag (exit 2, naming it) before a model is built.
    for script, args, word in (
        ("sampling.py", ("--cases", "no-such-case"), "no-such-case"),
        ("ppo_step.py", ("--itres", "3"), "--iters"),
        ("scan_layers.py", ("--layers", "two"), "--layers"),
    ):
        env = dict(os.environ, COLUMNS="200")
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and word in proc.stdout, (script, proc.stdout[-2000:])


@pytest.mark.slow
def test_gpu_suite_smoke(tmp_path):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    report = (tmp_path / "gpu_report.md").read_text()
    for title in (
        "Device",
        "Tests on the device",
        "Sampling, float32",
        "Sampling, bfloat16",
        "Sweeps",
        "PPO iteration",
        "PPO iteration, LoRA",
    ):
        assert f"## {title}" in report, title
    assert report.count("(exit 0,") == 7, report[-4000:]
