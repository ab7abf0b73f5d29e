"""Tests for jaxrlhf.metrics_log (JSONL, TensorBoard events, resume) and jaxrlhf.plotting (PNGs)."""

import glob
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jaxrlhf.metrics_log import MetricsLogger, flatten_metrics, read_metrics, sampled_token_curve
from jaxrlhf.plotting import moving_average, plot_curves, plot_metrics


def _log_steps(out_dir, steps, **kwargs):
    with MetricsLogger(out_dir, total_steps=10, progress_keys=("reward",), **kwargs) as logger:
        for step in steps:
            logger.log(
                step,
                {
                    "reward": jnp.float32(step * 0.5),  # a JAX scalar
                    "kl": np.float64(0.1 * step),  # a NumPy scalar
                    "loss": {"policy": 1.0 / (step + 1), "value": jnp.array([2.0])},  # nested, size-1
                    "done": step == 9,  # a bool
                },
            )


def test_jsonl_lines_are_flat_floats(tmp_path):
    _log_steps(tmp_path, range(5))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5
    first = json.loads(lines[2])
    assert first == {
        "step": 2,
        "reward": 1.0,
        "kl": pytest.approx(0.2),
        "loss/policy": pytest.approx(1 / 3),
        "loss/value": 2.0,
        "done": 0.0,
    }
    assert all(type(v) is float for k, v in first.items() if k != "step")
    records = read_metrics(tmp_path)  # a run directory works as well as the file path
    assert [r["step"] for r in records] == list(range(5))
    assert all(math.isfinite(v) for r in records for v in r.values())


def test_tensorboard_events_hold_the_scalars(tmp_path):
    _log_steps(tmp_path, range(5))
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"reward", "kl", "loss/policy", "loss/value", "done"} <= set(tags)
    rewards = events.Scalars("reward")
    assert [e.step for e in rewards] == list(range(5))
    assert [e.value for e in rewards] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])


def test_resume_appends_and_drops_steps_after_the_checkpoint(tmp_path):
    _log_steps(tmp_path, range(6))  # the first run got to step 5, but its last checkpoint was step 3
    _log_steps(tmp_path, range(4, 8), resume_step=3)
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == list(range(8))  # no duplicated 4 and 5
    events = EventAccumulator(str(tmp_path))
    events.Reload()  # TensorBoard, told the purge step, also shows each step once
    assert [e.step for e in events.Scalars("reward")] == list(range(8))
    _log_steps(tmp_path, [8])  # resume_step=None: plain append
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(9))


def test_read_metrics_skips_a_cut_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "x": 1.0}\n{"step": 1, "x"')
    assert read_metrics(path) == [{"step": 0, "x": 1.0}]
    path.write_text('{"step": 0, "x": 1.0}\n{"step": 1, "x"\n{"step": 2, "x": 1.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(path)


def test_sampled_token_curve_counts_tokens_up_to_each_evaluation(tmp_path):
    lines = [{"step": s, "score": 0.0, "num_sampled_tokens": 10.0 * (s + 1)} for s in range(4)]
    lines.insert(2, {"step": 1, "eval/acc": 0.5})  # an evaluation after steps 0 and 1: 10 + 20 tokens
    lines.append({"step": 3, "eval/acc": 0.75})  # after all four: 100 tokens
    lines.append({"step": 4, "score": 0.0, "num_response_tokens": 7.0})  # no num_sampled_tokens field
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert sampled_token_curve(tmp_path, "acc") == ([30.0, 100.0], [0.5, 0.75], 107.0)
    assert sampled_token_curve(tmp_path, "acc", start_value=0.25) == ([0.0, 30.0, 100.0], [0.25, 0.5, 0.75], 107.0)
    assert sampled_token_curve(tmp_path, "missing") == ([], [], 107.0)


def test_non_scalar_metric_is_rejected():
    with pytest.raises(ValueError, match="loss"):
        flatten_metrics({"loss": jnp.ones(3)})
    with pytest.raises(ValueError, match="name"):
        flatten_metrics({"name": "abc"})


def test_logger_without_tensorboard_or_bar(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, progress=False) as logger:
        assert logger.log(0, {"a": 1}) == {"a": 1.0}
        logger.write("a message")
    assert not glob.glob(str(tmp_path / "events.out.tfevents.*"))
    assert read_metrics(tmp_path) == [{"step": 0, "a": 1.0}]


def test_plot_metrics_writes_a_png(tmp_path):
    _log_steps(tmp_path, range(10))
    out = plot_metrics(
        tmp_path / "metrics.jsonl",
        ["reward", "kl", "loss/policy", "missing"],
        tmp_path / "plots" / "metrics.png",
        title="toy",
        smooth=3,
    )
    data = open(out, "rb").read()
    assert data.startswith(b"\x89PNG") and len(data) > 5000
    records = read_metrics(tmp_path)
    out2 = plot_metrics(records, ["reward"], tmp_path / "one.png")
    assert open(out2, "rb").read().startswith(b"\x89PNG")


def test_plot_curves_with_several_series(tmp_path):
    x = np.arange(50)
    out = plot_curves(
        {
            "success rate": {"REINFORCE": np.sin(x / 10), "Q-learning": (x, np.cos(x / 10))},
            "steps": {"gamma=0.9": x * 2.0},
        },
        tmp_path / "curves.png",
        title="curves",
        ylims={"success rate": (-1, 1)},
        ylabels={"steps": "steps to goal"},
        smooth=5,
    )
    data = open(out, "rb").read()
    assert data.startswith(b"\x89PNG") and len(data) > 5000
    with pytest.raises(ValueError):
        plot_curves({"bad": {"s": (np.arange(3), np.arange(4))}}, tmp_path / "bad.png")


def test_moving_average():
    np.testing.assert_allclose(moving_average([1.0, 3.0, 5.0, 7.0], 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(moving_average([1.0, 2.0], 1), [1.0, 2.0])
