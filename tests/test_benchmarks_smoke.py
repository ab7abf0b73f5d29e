"""The benchmark scripts run end to end in their --quick mode and print their result lines.

Slow: each compiles a jitted step and runs a PyTorch baseline (about 35 s of CPU time each for
ppo_step.py; on the shared 2-core machine that was 2 minutes of wall time).
"""

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
    ):
        assert f"## {title}" in report, title
    assert report.count("(exit 0,") == 6, report[-4000:]
