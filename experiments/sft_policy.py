"""The SFT policy an RL experiment starts from: `<sft_dir>/model`, written by a sibling SFT script.

Shared by randomwalks_ppo.py and countdown_rl.py (and compare_algorithms.py through them). The SFT
run's task settings (its `config.json`) must be the RL run's: a policy trained on one graph or
problem set and rewarded on another would learn from a meaningless reward.

The SFT scripts' common run, `train_and_save` (training with metrics and held-out evaluation,
then the policy saved) and `write_summary`, is here too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def sft_run_config(sft_dir: str) -> dict[str, Any]:
    """The SFT run's saved settings (`<sft_dir>/config.json`), or {} for a model saved without them."""
    path = os.path.join(sft_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def check_task_settings(sft_dir: str, task_settings: dict[str, Any], what: str) -> None:
    """Stop when the SFT run's `config.json` names other task settings than ``task_settings``
    (``what``: the task's data, e.g. "graph", for the message). Settings it lacks are accepted."""
    saved = sft_run_config(sft_dir)
    differ = [f"{k} {saved[k]!r} there, {v!r} here" for k, v in task_settings.items() if saved.get(k, v) != v]
    if differ:
        raise SystemExit(
            f"the SFT policy in {sft_dir} was trained on another {what} ({'; '.join(differ)}): "
            f"pass the matching --sft_dir or the {what}'s settings"
        )


def load_sft_policy(
    sft_dir: str,
    script: str,
    task_settings: dict[str, Any],
    run_if_missing: bool,
    what: str,
    sft_overrides: dict[str, Any] | None = None,
):
    """The SFT policy of ``<sft_dir>/model`` (a `Pretrained`), checked against ``task_settings``.

    A finished SFT run (its ``summary.json``, written last) is used as it is, and the run says so. A
    run directory without one (an SFT run that stopped early: its ``model/`` may be there, its
    plot and summary are not), or no model at all, is trained (again) first: `experiments/<script>.py`'s
    `main` with ``out_dir=sft_dir``, the task settings and ``sft_overrides`` (other fields of its
    config, e.g. ``num_steps``), when ``run_if_missing``; else the run stops with the command to
    type. A model directory saved by other means (no SFT ``config.json`` beside it) is used as it is.
    """
    from jaxrlhf.models import load_pretrained

    model_dir = os.path.join(sft_dir, "model")
    path = os.path.join(HERE, f"{script}.py")
    has_model = os.path.isfile(os.path.join(model_dir, "config.json"))
    is_run = os.path.isfile(os.path.join(sft_dir, "config.json"))
    finished = os.path.isfile(os.path.join(sft_dir, "summary.json"))
    if has_model:  # another task's run is refused before it is used or trained again
        check_task_settings(sft_dir, task_settings, what)
    if has_model and (finished or not is_run):
        state = "the finished SFT run" if finished else "the model"
        print(f"SFT: using {state} in {sft_dir} (not trained again; delete it, or pass another --sft_dir, to retrain)")
    else:
        reason = (
            f"the SFT run in {sft_dir} did not finish (no summary.json)"
            if has_model
            else f"no SFT policy in {model_dir}"
        )
        if not run_if_missing:
            raise SystemExit(f"{reason}: run `python {path} --out_dir {sft_dir}` first")
        print(f"{reason}: running {path} --out_dir {sft_dir}")
        spec = importlib.util.spec_from_file_location(script, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[script] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        module.main(module.Config(out_dir=sft_dir, **task_settings, **(sft_overrides or {})))
    check_task_settings(sft_dir, task_settings, what)
    return load_pretrained(model_dir)


def train_and_save(config, model, tokenizer, params, data, data_key, eval_fn):
    """`train_sft` of ``params`` on ``data``, logged to ``config.out_dir`` (JSONL, TensorBoard, a
    progress bar of loss and accuracy) with ``eval_fn(params, step) -> metrics`` every
    ``config.eval_every`` updates; then the policy saved (safetensors, config, tokenizer) to
    ``<out_dir>/model``. ``config``: an SFT script's config (``out_dir``, ``num_steps``,
    ``batch_size``, ``sft``, ``log_every``, ``eval_every``). Returns ``(params, last training
    metrics, model_dir)``."""
    from jaxrlhf.metrics_log import MetricsLogger
    from jaxrlhf.models import save_pretrained
    from jaxrlhf.training.sft import train_sft

    with MetricsLogger(config.out_dir, total_steps=config.num_steps, progress_keys=("loss", "accuracy")) as logger:
        params, last = train_sft(
            model.apply,
            params,
            data,
            data_key,
            config=config.sft,
            num_steps=config.num_steps,
            batch_size=config.batch_size,
            logger=logger,
            log_every=config.log_every,
            eval_fn=eval_fn,
            eval_every=config.eval_every,
        )
    model_dir = os.path.join(config.out_dir, "model")
    save_pretrained(model_dir, model, params, tokenizer)
    return params, last, model_dir


def write_summary(out_dir: str, summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` written to ``<out_dir>/summary.json`` (last: its presence marks a finished run,
    see `load_sft_policy`) and printed."""
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return summary
