"""Sweeps: R PPO runs (seeds x hyper-parameters) as one compiled program.

Because the numbers of a run are data in its `TrainState` (`jaxrlhf.training.hparams`), R runs
that share a structure differ only in array values, and one step can train all of them:

    sweep state   every leaf of the TrainState with a leading run axis [R, ...]
    frozen        the reference (and reward model) parameters, shared by all runs, not copied
    prompts       [R, B, P]: each run's batch in its own seed's order
    step          jax.vmap(PPO.fused_step) over the run axis, under one jax.jit

Run r computes what a single run with run r's seed and numbers computes (the same function on
the same inputs). On a mesh with a ``"runs"`` axis the run axis is split over it (``vmap``'s
``spmd_axis_name``), and each run's batch is data-parallel over ``"data"``/``"fsdp"`` inside;
without one, every device holds every run.

A run whose step is non-finite (NaN scores, a diverging update) is frozen: its state stays at the
last good step, ``active[r]`` turns False and ``failed_step[r]`` records the step, while the other
runs go on training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrlhf.models.lm import LanguageModel
from jaxrlhf.models.value import ValueModel
from jaxrlhf.sharding import RUNS, batch_sharding, global_array, replicated
from jaxrlhf.training import pipeline
from jaxrlhf.training.config import PPOConfig
from jaxrlhf.training.experience import PromptBatch, Rollout
from jaxrlhf.training.hparams import build_config, initial_numbers, run_configs
from jaxrlhf.training.ppo import PPO, Metrics
from jaxrlhf.training.rewards import RewardShapeError
from jaxrlhf.training.state import FrozenParams, TrainState
from jaxrlhf.tuning import Tuning

RUNS_AXIS = RUNS  # a sweep's mesh axis: `jaxrlhf.sharding.make_mesh(runs=...)`


@flax.struct.dataclass
class SweepState:
    """The state of a whole sweep (a pytree; checkpointed as a whole).

    Attributes:
      step: int32 scalar, sweep iterations done.
      runs: the runs' `TrainState`, every leaf ``[R, ...]``.
      active: bool ``[R]``; False once a run produced a non-finite step.
      failed_step: int32 ``[R]``, the step that failed (-1 while active).
    """

    step: jax.Array
    runs: TrainState
    active: jax.Array
    failed_step: jax.Array

    @property
    def num_runs(self) -> int:
        return int(self.active.shape[0])

    def run(self, index: int) -> TrainState:
        """Run ``index``'s `TrainState` (a slice of every leaf)."""
        return jax.tree.map(lambda x: x[index], self.runs)


def _keep_where(keep, new, old):
    return jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, old)


class Sweep:
    """R PPO runs of one structure, trained by one jitted step.

    Args:
      config: the base `PPOConfig` (structure, and every number a run does not override).
      policy, reward, critic: as for `PPO`.
      runs: per-run overrides of numeric fields and the seed, e.g. from `grid`:
        ``[{"seed": 0, "kl_coef": 0.1}, ...]``; checked by `run_configs` before anything
        is compiled.
      mesh: a mesh with a ``"runs"`` axis (runs split over it; it must divide R) and/or ``"data"``
        (``"fsdp"``) axes for each run's batch, e.g. ``jaxrlhf.sharding.make_mesh(runs=4, data=2)``;
        None = one device.
      tuning: as for `PPO` (the rows per device are one run's).
      shared_decode_stop: the rollout's decode loop runs until every row of every run is done
        (one unbatched stop predicate, `generate`'s ``stop_axis_name``) instead of stopping per
        run. Same samples; under ``vmap`` a per-run stop makes JAX select every loop carry (the
        KV caches) between old and new in every step. False only to measure that difference.
    """

    def __init__(
        self,
        config: PPOConfig,
        policy: LanguageModel,
        reward: Any,
        runs: Sequence[Mapping[str, Any]],
        critic: ValueModel | None = None,
        mesh: Mesh | None = None,
        shared_decode_stop: bool = True,
        tuning: Tuning | str | None = "auto",
        environment=None,
    ):
        if environment is not None and environment.on_host:
            raise ValueError(
                f"a sweep vmaps its runs inside one program: environment {environment.name} runs on the host "
                "(train its runs one by one with train, or write it in JAX)"
            )
        self.run_configs = run_configs(config, runs)
        self.overrides = [dict(r) for r in runs]
        self.num_runs = len(self.run_configs)
        self.ppo = PPO(
            build_config(self.run_configs),
            policy,
            reward,
            critic=critic,
            mesh=mesh,
            tuning=tuning,
            environment=environment,
        )
        self.mesh = self.ppo.mesh
        self.runs_axis = RUNS_AXIS if RUNS_AXIS in self.mesh.axis_names else None
        if self.runs_axis is not None and self.num_runs % self.mesh.shape[RUNS_AXIS]:
            raise ValueError(
                f"{self.num_runs} runs cannot be split over a '{RUNS_AXIS}' mesh axis of "
                f"{self.mesh.shape[RUNS_AXIS]} devices: use a divisor of the run count"
            )
        self.uses_host_reward = self.ppo.uses_host_reward
        self.stop_axis_name = RUNS_AXIS if shared_decode_stop else None
        self.config = config  # what checkpoints and the driver read (save_every, total_steps ...)

        abstract_runs = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct((self.num_runs, *s.shape), s.dtype, sharding=self._stacked(s.sharding)),
            self.ppo.abstract_state(),
        )
        per_run = lambda dtype: jax.ShapeDtypeStruct((self.num_runs,), dtype, sharding=self.run_sharding())  # noqa: E731
        # The abstract state: a SweepState holding ShapeDtypeStructs where its fields are typed as arrays.
        abstract_fields: dict[str, Any] = dict(
            step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(self.mesh)),
            runs=abstract_runs,
            active=per_run(jnp.bool_),
            failed_step=per_run(jnp.int32),
        )
        self._abstract_state = SweepState(**abstract_fields)
        self._state_shardings = jax.tree.map(lambda s: s.sharding, self._abstract_state)

        rep_runs = self.run_sharding()
        step_out = (self._state_shardings, rep_runs)
        # The programs that sample compile with the trainer's tuning options (`PPO`'s `tuning`).
        self._jit_fused = self.ppo.fused_tuning.jit(self._fused, out_shardings=step_out)
        # One sharding for the whole Rollout (a pytree prefix): every field is batch-sharded.
        self._jit_rollout = self.ppo.tuning.jit(self._rollout, out_shardings=self.batch_sharding())
        self._jit_update = jax.jit(self._update, out_shardings=step_out)
        self._jit_init = jax.jit(self._init, out_shardings=self._state_shardings)
        self._jit_fill = self.ppo.tuning.jit(self._fill, out_shardings=self._state_shardings)

    # ------------------------------------------------------------------ shardings

    def _stacked(self, sharding: NamedSharding) -> NamedSharding:
        return NamedSharding(self.mesh, P(self.runs_axis, *sharding.spec))

    def run_sharding(self) -> NamedSharding:
        """Arrays ``[R, ...]`` of per-run scalars: split over ``"runs"`` (replicated without it)."""
        return NamedSharding(self.mesh, P(self.runs_axis))

    def batch_sharding(self) -> NamedSharding:
        """Arrays ``[R, B, ...]``: runs over ``"runs"``, each run's batch over the data axes."""
        return self._stacked(batch_sharding(self.mesh))

    def abstract_state(self) -> SweepState:
        return self._abstract_state

    def state_shardings(self) -> SweepState:
        return self._state_shardings

    def _vmap(self, fn, in_axes):
        # axis_name: the decode loop's shared stop reduces over the runs (see shared_decode_stop).
        return jax.vmap(fn, in_axes=in_axes, axis_name=RUNS_AXIS, spmd_axis_name=self.runs_axis)

    # ------------------------------------------------------------------ state

    def _init(self, policy_params, value_params, seeds_R, numbers_R) -> SweepState:
        def init_one(seed, numbers):
            return self.ppo._init_from_seed(policy_params, value_params, seed, numbers)

        runs = self._vmap(init_one, (0, 0))(seeds_R, numbers_R)
        return SweepState(
            step=jnp.zeros((), jnp.int32),
            runs=runs,
            active=jnp.ones((self.num_runs,), bool),
            failed_step=jnp.full((self.num_runs,), -1, jnp.int32),
        )

    def init_state(self, policy_params, value_params=None) -> SweepState:
        """Every run's initial state from the same starting parameters and its own seed and numbers."""
        seeds_R = jnp.asarray([c.seed for c in self.run_configs], jnp.uint32)
        numbers_R = jax.tree.map(lambda *xs: jnp.stack(xs), *[initial_numbers(c) for c in self.run_configs])
        return self._jit_init(policy_params, value_params, seeds_R, numbers_R)

    def frozen_params(self, ref_params, reward_params=None) -> FrozenParams:
        """Shared by all runs: placed once, as for a single run."""
        return self.ppo.frozen_params(ref_params, reward_params)

    def prompt_batch(self, prompt_ids_RxBxP, prompt_mask_RxBxP) -> PromptBatch:
        sharding = self.batch_sharding()
        return PromptBatch(
            global_array(np.asarray(prompt_ids_RxBxP, np.int32), sharding),
            global_array(np.asarray(prompt_mask_RxBxP, np.int32), sharding),
        )

    def prompt_batches(self, prompt_ids_RxKxBxP, prompt_mask_RxKxBxP) -> PromptBatch:
        """Each run's prompts of its next ``max_staleness`` steps, ``[R, k, B / G, P]`` (`fill_step`)."""
        sharding = NamedSharding(self.mesh, P(self.runs_axis, None, *self.ppo.prompt_batches_sharding_spec()))
        return PromptBatch(
            global_array(np.asarray(prompt_ids_RxKxBxP, np.int32), sharding),
            global_array(np.asarray(prompt_mask_RxKxBxP, np.int32), sharding),
        )

    # ------------------------------------------------------------------ the step

    def _commit(self, sweep_state: SweepState, new_runs: TrainState, metrics: Metrics) -> tuple[SweepState, Metrics]:
        """Keep each run's new state only if its step was finite and it is still active."""
        ok_R = metrics["all_finite"] & sweep_state.active
        runs = self._vmap(_keep_where, (0, 0, 0))(ok_R, new_runs, sweep_state.runs)
        newly_failed_R = sweep_state.active & ~metrics["all_finite"]
        failed_step = jnp.where(newly_failed_R, sweep_state.step, sweep_state.failed_step)
        new_state = SweepState(step=sweep_state.step + 1, runs=runs, active=ok_R, failed_step=failed_step)
        return new_state, {**metrics, "active": ok_R}

    def _fused(self, sweep_state: SweepState, frozen: FrozenParams, batch: PromptBatch):
        step = lambda state, run_batch: self.ppo.fused_step(state, frozen, run_batch, self.stop_axis_name)  # noqa: E731
        new_runs, metrics = self._vmap(step, (0, 0))(sweep_state.runs, batch)
        return self._commit(sweep_state, new_runs, metrics)

    def _rollout(self, sweep_state: SweepState, frozen: FrozenParams, batch: PromptBatch) -> Rollout:
        rollout = lambda state, run_batch: self.ppo.rollout(state, frozen, run_batch, self.stop_axis_name)  # noqa: E731
        return self._vmap(rollout, (0, 0))(sweep_state.runs, batch)

    def _update(
        self, sweep_state: SweepState, frozen: FrozenParams, batch: PromptBatch, rollout_out: Rollout, raw_scores_RxB
    ):
        update = lambda state, b, r, s: self.ppo.update(state, frozen, b, r, s)  # noqa: E731
        new_runs, metrics = self._vmap(update, (0, 0, 0, 0))(sweep_state.runs, batch, rollout_out, raw_scores_RxB)
        return self._commit(sweep_state, new_runs, metrics)

    def _fill(self, sweep_state: SweepState, frozen: FrozenParams, batches: PromptBatch) -> SweepState:
        fill = lambda state, run_batches: self.ppo.fill_pipeline(state, frozen, run_batches, self.stop_axis_name)  # noqa: E731
        return dataclasses.replace(sweep_state, runs=self._vmap(fill, (0, 0))(sweep_state.runs, batches))

    def fill_step(self, sweep_state: SweepState, frozen: FrozenParams, batches: PromptBatch) -> SweepState:
        """Every run's queue filled (``max_staleness > 0``; `PPO.fill_pipeline` vmapped over the runs),
        ``batches`` from `prompt_batches`."""
        return self._jit_fill(sweep_state, frozen, batches)

    def needs_fill(self, sweep_state: SweepState) -> bool:
        """Whether a run's queue has an empty slot (a fresh sweep with ``max_staleness > 0``)."""
        return self.ppo.config.max_staleness > 0 and pipeline.is_empty(sweep_state.runs.pipeline)

    def train_step(
        self, sweep_state: SweepState, frozen: FrozenParams, batch: PromptBatch
    ) -> tuple[SweepState, Metrics]:
        """One iteration of every run (JAX reward): metrics are ``[R]`` arrays."""
        if self.uses_host_reward:
            raise TypeError("a TextReward is scored on the host: use rollout_step, then update_step")
        return self._jit_fused(sweep_state, frozen, batch)

    def rollout_step(self, sweep_state: SweepState, frozen: FrozenParams, batch: PromptBatch) -> Rollout:
        """Every run's responses, ``[R, B, N]`` (first half of the split step, for a `TextReward`)."""
        return self._jit_rollout(sweep_state, frozen, batch)

    def update_step(self, sweep_state, frozen, batch, rollout_out: Rollout, raw_scores_RxB):
        """Second half of the split step from host scores ``[R, B]``."""
        scores = np.asarray(raw_scores_RxB, np.float32)
        expected = (self.num_runs, self.ppo.config.rollout_size)
        if scores.shape != expected:
            raise RewardShapeError(
                f"a sweep's text reward must give scores of shape {expected} (runs, batch); got {scores.shape}"
            )
        scores = global_array(scores, self.batch_sharding())
        return self._jit_update(sweep_state, frozen, batch, rollout_out, scores)

    def compiled_step_count(self, which: str = "fused") -> int:
        return {"fused": self._jit_fused, "rollout": self._jit_rollout, "update": self._jit_update}[which]._cache_size()


def split_metrics(metrics: dict[str, Any], num_runs: int) -> list[dict[str, float]]:
    """``{name: [R]}`` -> R dicts of floats."""
    host = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
    return [{k: float(v[r]) for k, v in host.items()} for r in range(num_runs)]
