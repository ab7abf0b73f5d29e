"""End to end: experiments/randomwalks_sft.py then experiments/randomwalks_ppo.py with tiny configs."""

import json
import math
import os

import pytest
from conftest import load_script

from jaxrlhf.metrics_log import read_metrics
from jaxrlhf.training.sft import SFTConfig


def all_finite(record):
    return all(math.isfinite(v) for v in record.values() if isinstance(v, (int, float)))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    sft = load_script("randomwalks_sft")
    out_dir = str(tmp_path_factory.mktemp("rw") / "sft")
    config = sft.Config(
        out_dir=out_dir,
        n_layer=1,
        n_embd=16,
        n_head=2,
        num_steps=4,
        batch_size=32,
        eval_every=2,
        eval_samples=2,
        log_every=1,
        sft=SFTConfig(learning_rate=1e-3),
    )
    summary = sft.main(config)
    return out_dir, summary


@pytest.mark.slow
def test_sft_script_end_to_end(sft_run):
    out_dir, summary = sft_run
    for name in (
        "config.json",
        "metrics.jsonl",
        "sft.png",
        "summary.json",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
    ):
        assert os.path.isfile(os.path.join(out_dir, name)), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out_dir))
    records = read_metrics(out_dir)
    assert [r["step"] for r in records if "loss" in r] == [0, 1, 2, 3]
    assert all(all_finite(r) for r in records)
    assert summary["hf_max_abs_logit_diff"] < 1e-3  # AutoModelForCausalLM loads it, same logits
    assert 0.0 <= summary["sampled/optimality"] <= 1.0


@pytest.mark.slow
def test_ppo_script_end_to_end(sft_run, tmp_path):
    sft_dir, _ = sft_run
    ppo = load_script("randomwalks_ppo")
    out_dir = str(tmp_path / "ppo")
    config = ppo.Config(
        out_dir=out_dir,
        sft_dir=sft_dir,
        run_sft_if_missing=False,
        eval_every=1,
        eval_samples=2,
        progress=False,
        ppo=ppo.Config().ppo.replace(total_steps=2, batch_size=20, minibatch_size=10, ppo_epochs=1, save_every=1),
    )
    summary = ppo.main(config)
    run_dir = os.path.join(out_dir, "run_0")
    for name in ("config.json", "randomwalks_ppo.png", "summary.json", "results.md", "sweep_summary.json"):
        assert os.path.isfile(os.path.join(out_dir, name)), name
    for name in ("metrics.jsonl", "policy/config.json", "policy/model.safetensors", "policy/tokenizer.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert os.listdir(os.path.join(out_dir, "checkpoints"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir))
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "score" in r] == [0, 1]
    assert all(all_finite(r) for r in records)
    assert [r["step"] for r in records if "eval/sampled/optimality" in r] == [0, 1]  # evaluated after steps 1, 2
    run = summary["runs"][0]
    for when in ("before", "after"):
        assert all(math.isfinite(v) for v in run[when].values())
    assert abs(run["before"]["sampled/kl_to_ref"]) < 1e-5  # the SFT policy is its own reference
    with open(os.path.join(out_dir, "summary.json")) as f:
        assert json.load(f)["over_seeds"]["after/sampled/optimality"]["values"] == [run["after"]["sampled/optimality"]]


def test_an_sft_policy_of_another_graph_is_refused(tmp_path):
    ppo = load_script("randomwalks_ppo")
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    trlx_graph = {"task_seed": 1002, "n_nodes": 21, "p_edge": 0.1, "max_length": 10}
    (sft_dir / "config.json").write_text(json.dumps(trlx_graph))
    ppo.check_sft_graph(ppo.Config(sft_dir=str(sft_dir)))  # the same graph: accepted
    with pytest.raises(SystemExit, match="task_seed 1002 there, 9 here"):
        ppo.check_sft_graph(ppo.Config(sft_dir=str(sft_dir), task_seed=9))


def test_compare_algorithms_names_its_directories_after_the_graph():
    compare = load_script("compare_algorithms")
    trlx = compare.resolve(compare.Config())
    assert (trlx.out_dir, trlx.sft_dir) == ("runs/compare_algorithms", "runs/randomwalks_sft")
    assert (trlx.task_seed, trlx.steps, trlx.batch_size, trlx.learning_rate, trlx.target) == (1002, 50, 128, 5e-5, 0.95)
    other = compare.resolve(compare.Config(task_seed=9, p_edge=0.15))
    assert (other.out_dir, other.sft_dir) == ("runs/compare_algorithms_seed9_p0.15", "runs/randomwalks_sft_seed9_p0.15")
    assert compare.resolve(compare.Config(task_seed=9, sft_dir="x", steps=7)).sft_dir == "x"
    assert compare.resolve(compare.Config(task_seed=9, steps=7)).steps == 7  # given values are kept
    countdown = compare.resolve(compare.Config(task="countdown"))
    assert (countdown.out_dir, countdown.sft_dir) == ("runs/compare_algorithms_countdown", "runs/countdown_sft")
    assert (countdown.task_seed, countdown.batch_size, countdown.target) == (0, 256, 0.85)
    with pytest.raises(SystemExit, match="unknown task 'maze'"):
        compare.resolve(compare.Config(task="maze"))


def test_ppo_script_says_what_to_run_without_sft(tmp_path):
    ppo = load_script("randomwalks_ppo")
    config = ppo.Config(out_dir=str(tmp_path / "ppo"), sft_dir=str(tmp_path / "missing"), run_sft_if_missing=False)
    with pytest.raises(SystemExit, match="randomwalks_sft.py"):
        ppo.main(config)


@pytest.mark.slow
def test_compare_algorithms_end_to_end(sft_run, tmp_path):
    compare = load_script("compare_algorithms")
    out_dir = str(tmp_path / "compare")
    config = compare.Config(
        out_dir=out_dir,
        sft_dir=sft_run[0],
        presets=("grpo", "remax"),
        seeds=(0, 1),
        steps=2,
        batch_size=16,
        minibatch_size=8,
        group_size=4,
        eval_every=1,
        eval_samples=2,
    )
    summary = compare.main(config)
    for name in ("config.json", "summary.json", "results.md", "compare_algorithms.png", "grpo/sweep_summary.json"):
        assert os.path.isfile(os.path.join(out_dir, name)), name
    grpo, remax = summary["results"]
    assert grpo["settings"]["advantage_estimator"] == "grpo" and grpo["settings"]["num_generations"] == 4
    assert remax["settings"]["advantage_estimator"] == "remax"
    for result in summary["results"]:
        assert len(result["tokens_sampled"]) == 2 and all(t > 0 for t in result["tokens_sampled"])
        assert all(math.isfinite(v) for v in result["after"]["sampled/optimality"]["values"])
        assert len(result["curves"][0][1]) == 3  # before + after steps 1 and 2
    assert open(os.path.join(out_dir, "results.md")).read().count("\n| ") >= 3


@pytest.fixture(scope="module")
def tiny_sft_model():
    """A random 1-layer model of the SFT script's shape family, its tokenizer and a few walks."""
    import jax

    from tasks import randomwalks as rw

    sft = load_script("randomwalks_sft")
    config = sft.Config(n_layer=1, n_embd=16, n_head=2)
    task = rw.make_task(config.task_seed, config.n_nodes, config.p_edge, config.max_length, 16)
    from jaxrlhf.tokenizers import char_tokenizer

    tokenizer = char_tokenizer(task.letters, model_max_length=config.max_length + 6)
    model = sft.make_model(config, tokenizer)
    return sft, config, model, model.init_params(jax.random.key(0)), tokenizer, rw.encode_walks(task, tokenizer)


@pytest.mark.slow
def test_hf_load_check_without_torch_reads_the_files_back_and_says_so(tiny_sft_model, tmp_path, monkeypatch, capsys):
    """`pip install -e .` brings no torch: the check then reads model/ without it (transformers'
    config and tokenizer, jaxrlhf's safetensors) instead of dying on `import torch`."""
    import importlib.util

    from jaxrlhf.models import save_pretrained

    sft, _, model, params, tokenizer, data = tiny_sft_model
    save_pretrained(str(tmp_path / "model"), model, params, tokenizer)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else find_spec(name, *a))
    result = sft.check_hf_load(str(tmp_path / "model"), model, params, data)
    assert result["hf_max_abs_logit_diff"] == 0.0
    assert "torch not installed: the transformers (PyTorch) load was skipped" in result["hf_load_check"]
    assert "HF load check: torch not installed" in capsys.readouterr().out


def test_a_finished_sft_stage_is_reused_with_a_message_and_an_unfinished_one_is_not(tiny_sft_model, tmp_path, capsys):
    """The Quickstart's rerun after a crash in the SFT stage used to skip to PPO without a word,
    on an SFT run with no summary or plot."""
    import sft_policy
    from jaxrlhf.config import save_config
    from jaxrlhf.models import save_pretrained

    _, config, model, params, tokenizer, _ = tiny_sft_model
    run = tmp_path / "sft"
    save_config(config, run / "config.json")
    save_pretrained(str(run / "model"), model, params, tokenizer)
    graph = {"task_seed": config.task_seed}
    with pytest.raises(SystemExit, match=r"the SFT run in .*sft did not finish \(no summary.json\): run `python"):
        sft_policy.load_sft_policy(str(run), "randomwalks_sft", graph, False, "graph")
    with pytest.raises(SystemExit, match="another graph"):  # another task's run is refused first
        sft_policy.load_sft_policy(str(run), "randomwalks_sft", {"task_seed": 9}, True, "graph")
    (run / "summary.json").write_text("{}")
    loaded = sft_policy.load_sft_policy(str(run), "randomwalks_sft", graph, False, "graph")
    assert loaded.config == model.config
    assert "SFT: using the finished SFT run in" in capsys.readouterr().out
    (run / "config.json").unlink()  # a model directory made by other means is used as it is
    (run / "summary.json").unlink()
    sft_policy.load_sft_policy(str(run), "randomwalks_sft", graph, False, "graph")
    assert "SFT: using the model in" in capsys.readouterr().out
