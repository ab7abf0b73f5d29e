"""experiments/gridworld.py: the environment's rules, a tiny end-to-end run, and that both agents
learn to reach the diamond with the default number of episodes."""

import dataclasses
import importlib.util
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.config import load_config
from jaxrlhf.metrics_log import read_metrics


def _load_experiment():
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "gridworld.py")
    spec = importlib.util.spec_from_file_location("gridworld_experiment", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and typing.get_type_hints look the module up
    spec.loader.exec_module(module)
    return module


gridworld = _load_experiment()


def test_env_step_rules():
    env = gridworld.make_gridworld(("S#F", ".D."))
    key = jax.random.key(0)
    left, up, right, down = range(4)
    step = lambda cell, action, cost=0.0: gridworld.env_step(env, key, jnp.int32(cell), action, cost, 0.0)  # noqa: E731
    assert [int(x) for x in step(0, left)] == [0, 0, 0]  # border: stay
    assert [int(x) for x in step(0, right)] == [0, 0, 0]  # wall: stay
    cell, reward, terminal = step(0, down, 0.1)
    assert (int(cell), float(reward), bool(terminal)) == (3, pytest.approx(-0.1), False)
    assert (int(step(3, right)[0]), float(step(3, right)[1]), bool(step(3, right)[2])) == (4, 1.0, True)
    assert (float(step(5, up)[1]), bool(step(5, up)[2])) == (-1.0, True)  # fire
    assert gridworld.shortest_path_length(("S#F", ".D.")) == 2


def test_arrow_grid_marks_cells():
    table = np.zeros((6, 4))
    table[3, 2] = 1.0  # bottom-left cell prefers "right"
    assert gridworld.arrow_grid(table, ("S#F", ".D.")) == ["· # F", "→ D ·"]


@pytest.mark.slow
def test_tiny_run_writes_all_outputs(tmp_path):
    config = gridworld.Config(
        out_dir=str(tmp_path), num_batches=4, episodes_per_batch=4, num_seeds=2, eval_episodes=8, max_steps=10
    )
    summary = gridworld.main(config)
    for name in ("config.json", "metrics.jsonl", "gridworld.png", "summary.json"):
        assert os.path.getsize(tmp_path / name) > 0, name
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
    assert load_config(gridworld.Config, tmp_path / "config.json") == config
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(4))
    assert all(math.isfinite(v) for r in records for v in r.values())
    assert "reinforce/g0.9/success" in records[0] and "q_learning/g1_cost0.01/length" in records[0]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["main"]["gamma"] == 0.9 and len(saved["variants"]) == 3  # 0.9, 1.0, 1.0 + cost
    assert len(saved["main"]["q_learning_arrows_seed0"]) == len(config.grid)
    assert summary["shortest_path_length"] == 8


@pytest.mark.slow
def test_both_agents_reach_the_diamond_with_default_episodes(tmp_path):
    default = gridworld.Config()
    config = dataclasses.replace(default, out_dir=str(tmp_path), num_seeds=2, gamma_study=(), step_cost=0.0)
    assert config.num_batches * config.episodes_per_batch == default.num_batches * default.episodes_per_batch
    main = gridworld.main(config)["main"]
    for agent in ("reinforce_sampled", "reinforce_greedy", "q_learning_greedy"):
        assert main[agent]["success_rate"] >= 0.95, (agent, main[agent])
    assert main["q_learning_greedy"]["success_length"] == 8.0  # gamma = 0.9: the shortest path
    assert main["reinforce_train_success_last10pct"] >= 0.9
