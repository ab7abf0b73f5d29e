"""Checkpoints of the `TrainState` with Orbax: periodic, asynchronous, last K kept, exact resume.

Each checkpoint is a step directory holding two items::

    state  the TrainState pytree (`ocp.args.StandardSave`): params, optimizer states (with their
           injected numbers), KL controller, score statistics, hyper-parameters, step and PRNG
           key, so N steps + restore + N steps equals 2N steps; for a sweep the `SweepState`;
    meta   JSON (`ocp.args.JsonSave`): the PPOConfig and the model configs it was trained with,
           and a sweep's per-run overrides.

Restoring reads ``meta`` first and refuses a checkpoint from an incompatible setup with a
`CheckpointMismatchError` naming the differing fields, before anything is compiled or loaded;
then it restores ``state`` onto an abstract target of `jax.ShapeDtypeStruct`s carrying the current
mesh's shardings, so each device (and host) reads only its own shards.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import orbax.checkpoint as ocp

from jaxrlhf.config import config_to_dict
from jaxrlhf.training.config import RESUME_MUTABLE_FIELDS
from jaxrlhf.training.config import PPOConfig
from jaxrlhf.training.ppo import PPO

FORMAT_VERSION = 2  # 2: hyper-parameters in the state (TrainState.hparams, injected optimizer numbers)


class CheckpointMismatchError(ValueError):
    """The checkpoint directory was written by a run with an incompatible configuration."""


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value))


def checkpoint_metadata(ppo: PPO, config: PPOConfig, sweep_runs=None) -> dict:
    """What a checkpoint records about the run that wrote it (JSON values only)."""
    critic = None if ppo.critic is None else dataclasses.asdict(ppo.critic.config)  # shared trunk / critic-free
    return _json_roundtrip({
        "format_version": FORMAT_VERSION,
        "ppo_config": config_to_dict(config),
        "policy_config": dataclasses.asdict(ppo.policy.config),
        "critic_config": critic,
        "sweep_runs": sweep_runs,
    })


def metadata_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable list of the differences that make resuming from ``saved`` unsafe."""
    problems = []
    if saved.get("format_version") != current["format_version"]:
        problems.append(f"format_version: checkpoint {saved.get('format_version')}, code {current['format_version']}")
    saved_ppo, current_ppo = saved.get("ppo_config", {}), current["ppo_config"]
    mutable = set(RESUME_MUTABLE_FIELDS)
    if current_ppo.get("lr_schedule") == "constant" and saved_ppo.get("lr_schedule") == "constant":
        mutable.add("total_steps")  # only a decaying schedule depends on the run's length
    for name in sorted(set(saved_ppo) | set(current_ppo)):
        if name in mutable:
            continue
        if saved_ppo.get(name, "<missing>") != current_ppo.get(name, "<missing>"):
            problems.append(f"ppo_config.{name}: checkpoint {saved_ppo.get(name, '<missing>')!r}, "
                            f"now {current_ppo.get(name, '<missing>')!r}")
    if saved.get("sweep_runs") != current["sweep_runs"]:
        problems.append(f"sweep_runs: checkpoint {saved.get('sweep_runs')!r}, now {current['sweep_runs']!r}")
    for key in ("policy_config", "critic_config"):
        saved_cfg, current_cfg = saved.get(key), current[key]
        if saved_cfg == current_cfg:
            continue
        if not isinstance(saved_cfg, dict) or not isinstance(current_cfg, dict):
            problems.append(f"{key}: checkpoint {saved_cfg!r}, now {current_cfg!r}")
            continue
        for name in sorted(set(saved_cfg) | set(current_cfg)):
            if saved_cfg.get(name) != current_cfg.get(name):
                problems.append(f"{key}.{name}: checkpoint {saved_cfg.get(name)!r}, now {current_cfg.get(name)!r}")
    return problems


class Checkpointer:
    """An Orbax `CheckpointManager` for one run's `TrainState` or a whole sweep's `SweepState`.

    Args:
      directory: where step directories go (created).
      trainer: the run's `PPO` or the `Sweep` (its mesh gives the restore shardings).
      config: the run's config (default: the trainer's); it gives ``save_every`` and
        ``keep_checkpoints`` and is recorded in the metadata.
      async_save: write in a background thread while training goes on.
    """

    def __init__(self, directory: str | os.PathLike, trainer, config: Optional[PPOConfig] = None,
                 async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        self.trainer = trainer
        config = trainer.config if config is None else config
        ppo = trainer if isinstance(trainer, PPO) else trainer.ppo
        sweep_runs = None if isinstance(trainer, PPO) else trainer.overrides
        self.metadata = checkpoint_metadata(ppo, config, sweep_runs)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=config.save_every,
            max_to_keep=config.keep_checkpoints,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._saved_steps = set(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def saved_metadata(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def check_compatible(self, step: int) -> None:
        """Raises `CheckpointMismatchError` if checkpoint ``step`` came from an incompatible setup."""
        problems = metadata_differences(self.saved_metadata(step), self.metadata)
        if problems:
            raise CheckpointMismatchError(
                f"cannot resume from {self.directory} (step {step}): it was written with a different "
                "configuration:\n  " + "\n  ".join(problems)
                + "\nUse a new output directory, or restore the original configuration.")

    def save(self, state, force: bool = False) -> bool:
        """Saves ``state`` under its step if ``save_every`` divides it (or ``force``); returns
        whether a save started. Asynchronous: call `wait` before reading the files."""
        step = int(state.step)
        if step in self._saved_steps:
            return False
        started = self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(self.metadata)),
            force=force,
        )
        if started:
            self._saved_steps.add(step)
        return started

    def restore(self, step: Optional[int] = None):
        """The state of checkpoint ``step`` (default: latest), after the compatibility check."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self.check_compatible(step)
        target = self.trainer.abstract_state()
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
