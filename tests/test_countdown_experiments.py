"""The countdown scripts end to end on a tiny model: SFT, then RL from it (seeds as one sweep)."""

import dataclasses
import json
import math
import os

import pytest
from conftest import load_script

from jaxrlhf.metrics_log import read_metrics
from jaxrlhf.training.sft import SFTConfig


@pytest.mark.slow
def test_sft_then_rl_end_to_end(tmp_path):
    sft, rl = load_script("countdown_sft"), load_script("countdown_rl")
    task = dict(task_seed=0, num_problems=400, ops="+-", ordered=True)
    sft_dir = str(tmp_path / "sft")
    sft.main(
        sft.Config(
            out_dir=sft_dir,
            n_layer=1,
            n_embd=16,
            n_head=2,
            num_steps=3,
            batch_size=16,
            eval_every=3,
            **task,
            sft=SFTConfig(learning_rate=1e-3),
        )
    )
    config = rl.Config(
        out_dir=str(tmp_path / "rl"),
        sft_dir=sft_dir,
        preset="grpo",
        seeds=(0, 1),
        eval_every=1,
        eval_samples=1,
        progress=False,
        ppo=rl.Config().ppo.replace(total_steps=2, batch_size=16, minibatch_size=16, save_every=2),
        **task,
    )
    summary = rl.main(config)
    assert [run["steps"] for run in summary["runs"]] == [2, 2]
    for run in summary["runs"]:
        assert not run["failed"]
        assert set(run["after"]) >= {"greedy/accuracy", "sampled/accuracy", "sampled/kl_to_ref"}
        assert all(math.isfinite(v) for v in run["after"].values())
        evals = [r for r in read_metrics(run["run_dir"]) if "eval/greedy/accuracy" in r]
        assert len(evals) == 2  # eval_every=1: after each of the 2 steps
    assert os.path.isfile(tmp_path / "rl" / "countdown_rl.png")
    with open(tmp_path / "rl" / "summary.json") as f:
        assert json.load(f)["preset"] == "grpo"
    # An SFT policy of another problem set is refused before any training.
    with pytest.raises(SystemExit, match="another problem set"):
        rl.main(dataclasses.replace(config, ordered=False))

    # compare_algorithms on countdown, from the same SFT policy (its problem set read from its config).
    compare = load_script("compare_algorithms")
    out_dir = str(tmp_path / "compare")
    settings = dict(steps=2, batch_size=16, minibatch_size=16, group_size=4, eval_every=1, eval_samples=1)
    compare_config = compare.Config(
        task="countdown", out_dir=out_dir, sft_dir=sft_dir, presets=("grpo", "rloo"), seeds=(0, 1), **settings
    )
    summary = compare.main(compare_config)
    assert summary["task"] == "countdown" and summary["problems"]["ordered"] is True
    assert [r["preset"] for r in summary["results"]] == ["grpo", "rloo"]
    for result in summary["results"]:
        assert result["settings"]["num_generations"] == 4
        # What was trained is the preset: critic-free, group metrics (read from the run's own log).
        logged = read_metrics(os.path.join(out_dir, result["preset"], "run_0"))[0]
        assert "group_signal_fraction" in logged and "vf_loss" not in logged, sorted(logged)
        assert len(result["tokens_sampled"]) == 2 and all(t > 0 for t in result["tokens_sampled"])
        assert all(math.isfinite(v) for v in result["after"]["greedy/accuracy"]["values"])
        assert len(result["curves"][0][1]) == 3  # the SFT's, then after steps 1 and 2
    table = open(os.path.join(out_dir, "results.md")).read()
    assert "held-out greedy accuracy" in table and table.count("\n| ") >= 3
    assert os.path.isfile(os.path.join(out_dir, "compare_algorithms.png"))
    # Rerun with the same settings (a comparison cut short): finished presets are taken from summary.json.
    again = compare.main(compare_config)
    assert again["results"] == json.loads(json.dumps(summary["results"]))


def test_an_sft_policy_of_another_problem_set_is_refused(tmp_path):
    """countdown_rl stops before loading an SFT policy trained on other problems, or a missing one."""
    rl = load_script("countdown_rl")
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    defaults = rl.Config()
    saved = {k: getattr(defaults, k) for k in rl.TASK_FIELDS}
    (sft_dir / "config.json").write_text(json.dumps({**saved, "num_problems": 500}))
    config = rl.Config(sft_dir=str(sft_dir), run_sft_if_missing=False)
    with pytest.raises(SystemExit, match="no SFT policy"):  # no model/ yet, and not allowed to train one
        rl.load_sft_policy(config)
    (sft_dir / "model").mkdir()
    (sft_dir / "model" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="another problem set .*num_problems 500 there, 20000 here"):
        rl.load_sft_policy(config)
