"""The benchmark scripts run end to end in their quick modes and print their result lines.

`benchmarks/gpu_suite.sh --smoke` runs every benchmark (sampling, sweeps, the PPO iteration with
and without LoRA) once in its quick mode, so one test checks the suite and each script's output.
Slow: each benchmark compiles jitted steps, and ppo_step.py also runs a PyTorch baseline.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import SUBPROCESS_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str, timeout: int = 900) -> str:
    env = dict(os.environ)
    env["XLA_FLAGS"] = SUBPROCESS_XLA_FLAGS  # one CPU device, as the benchmarks are meant to run
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


@pytest.mark.slow
def test_rollout_engine_quick():
    # One row per comparison: refilled slots vs static waves, shared vs repeated GRPO prefill.
    out = _run("rollout_engine.py", "--quick")
    ratio = r"\d+\.\d+x"
    lengths = rf"^lengths-tiny-quick\s+32\s+8\s+32\s+\d+\.\d\s+\d+%\s+\d+\s+\d+\s+{ratio}\s+{ratio}$"
    assert re.search(lengths, out, re.MULTILINE), out[-4000:]
    pair = r"[\d.]+ / [\d.]+"  # repeated / shared
    grpo = rf"^grpo-tiny-quick\s+16\s+8\s+64\s+8\s+{pair}\s+{ratio}\s+8\.0x\s+{pair}\s+{ratio}\s+{ratio}$"
    assert re.search(grpo, out, re.MULTILINE), out[-4000:]


@pytest.mark.slow
def test_episodes_quick():
    # The toy calculator in the jit and on the host: one rollout row per turn count (identical
    # episodes both ways: "yes"), and the GRPO iteration both ways.
    out = _run("episodes.py", "--quick")
    num, ratio = r"\d+\.\d+", r"\d+\.\d+x"
    for turns in (1, 2):
        row = (
            rf"^tiny-k{turns}\s+16\s+{14 * turns}\s+{turns}\.0\s+\d+\s+\d+\s+\d+\s+{ratio}\s+{num}\s+-?{num}\s+"
            rf"{num}\s+{1 + 2 * turns}\s+-?{num} / -?{num}\s+yes$"
        )
        assert re.search(row, out, re.MULTILINE), out[-4000:]
    iteration = rf"^tiny-k2\s+16\s+2\s+{num}\s+{num}\s+\d+\s+\d+\s+{ratio}\s+-?{num} / -?{num}$"
    assert re.search(iteration, out, re.MULTILINE), out[-4000:]


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


def _section(report: str, title: str) -> str:
    """The output block of one ``## title`` section of the GPU suite's report."""
    body = report.split(f"## {title}\n", 1)[1]
    return body.split("\n## ", 1)[0]


@pytest.mark.slow
def test_gpu_suite_smoke(tmp_path):
    # The suite runs every benchmark in its quick mode: this one run also checks each benchmark's
    # result lines (ppo_step with and without LoRA, its FLOP table and files, sampling, sweeps).
    env = dict(os.environ)
    env["XLA_FLAGS"] = SUBPROCESS_XLA_FLAGS
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
    titles = (
        "Device",
        "Tests on the device",
        "Sampling, float32",
        "Sampling, bfloat16",
        "Sweeps",
        "PPO iteration",
        "GRPO iteration",
        "PPO iteration, LoRA",
    )
    for title in titles:
        assert f"## {title}" in report, title
    assert report.count("(exit 0,") == 8, report[-4000:]
    m = re.MULTILINE

    # Sampling: one row per case, "<case> <params>M <jaxrlhf tok/s> <torch tok/s> <ratio>x <compile s>"
    # (float32 against transformers' generate; bfloat16 without torch: "-").
    row = r"^tiny-b128-n10\s+\d+M\s+\d+\s+{torch}\s+{ratio}\s+\d+\.\d+$"
    assert re.search(row.format(torch=r"\d+", ratio=r"\d+\.\d+x"), _section(report, "Sampling, float32"), m)
    assert re.search(row.format(torch="-", ratio="-"), _section(report, "Sampling, bfloat16"), m)

    sweeps = _section(report, "Sweeps")
    assert [r for r in re.findall(r"^sweep R=(\d)\s+\d+\.\d+\s+\d+\.\d+x", sweeps, m)] == ["2"], sweeps
    assert re.search(r"^2 runs as one sweep: \d+\.\d+x the time of one run, \d+\.\d+x the throughput", sweeps, m)
    assert "load average" in sweeps and "matrix-product peak" in sweeps

    for title, algorithm in (("PPO iteration", "PPO"), ("GRPO iteration", "GRPO"), ("PPO iteration, LoRA", "PPO")):
        ppo = _section(report, title)
        ratio = re.search(rf"^ratio \(torch / jaxrlhf\) per {algorithm} iteration: (\d+\.\d+)x$", ppo, m)
        assert ratio and float(ratio.group(1)) > 0, ppo
        assert re.search(r"^iteration \(fused jit\)\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+x$", ppo, m), ppo
        assert "load average" in ppo and "compile" in ppo

    # GRPO's FLOP table: with one minibatch XLA's count covers the experience and the update whole,
    # and agrees with the shape count (no critic in either).
    grpo = _section(report, "GRPO iteration")
    assert "GRPO, 4 prompts x G = 4" in grpo, grpo
    rows = dict(
        (r[0], (float(r[1]), float(r[2])))
        for r in re.findall(r"^(experience|update) +(\d+\.\d+) +(\d+\.\d+) +(?:xla|shapes) ", grpo, m)
    )
    assert set(rows) == {"experience", "update"}, grpo
    for xla, shapes in rows.values():
        assert abs(xla - shapes) <= 0.1 * shapes, rows

    # LoRA on both sides (the script exits if their trainable counts differ), and the split phases'
    # FLOP table, also written as JSON and markdown.
    lora = _section(report, "PPO iteration, LoRA")
    counts = re.search(r"^trainable policy parameters: jaxrlhf ([\d,]+), torch ([\d,]+)$", lora, m)
    assert counts and counts.group(1) == counts.group(2), lora
    rows = re.findall(
        r"^(rollout|experience|update|fused) +(\d+\.\d+) +(\d+\.\d+) +(xla|shapes) +\d+\.\d+ +\d+\.\d+ +\d+\.\d%$",
        lora,
        m,
    )
    assert [r[0] for r in rows] == ["rollout", "experience", "update", "fused"], lora
    # No loop over matrix products in the experience program: XLA's count and the shape count agree.
    xla, shapes = float(rows[1][1]), float(rows[1][2])
    assert abs(xla - shapes) <= 0.1 * shapes, rows
    # The tiny model's decode step can be within the timing noise of a loaded machine: nan then.
    assert re.search(r"^decode step: (\d+\.\d+|nan) ms, .* MB read .* of it reached", lora, m), lora
    record = json.loads((tmp_path / "ppo_lora" / "ppo_step.json").read_text())
    assert record["config"]["lora_rank"] == 4
    assert [row["program"] for row in record["flops"]["programs"]] == ["rollout", "experience", "update", "fused"]
    assert "| decode step ms |" in (tmp_path / "ppo_lora" / "ppo_step.md").read_text()
