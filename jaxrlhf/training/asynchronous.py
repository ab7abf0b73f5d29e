"""The split-mesh trainer: rollouts on one sub-mesh, updates on another, overlapping.

`PPO` runs a step's rollout and update one after the other on the same devices. `SplitMeshPPO`
gives each its own devices (e.g. 4 + 4 of 8) and lets them run at the same time:

    step t (trainer mesh holds the TrainState, version t)
      copy the policy parameters (version t) to the sampler mesh        jax.device_put across meshes
      sampler mesh:  sample + score the prompts of step t + k            ┐ dispatched back to back:
      trainer mesh:  train on the oldest batch in flight (batch t)       ┘ JAX runs them concurrently
      copy the new batch to the trainer mesh, push it into the queue

The two programs of a step depend only on the state of version t, so with ``max_staleness = k >=
1`` neither waits for the other: both are dispatched (JAX's asynchronous dispatch) before either is
waited on, and devices that run independently (accelerators) run the rollout of a later step while
the update of this one runs. XLA:CPU executes one program at a time, even on disjoint simulated
devices, so on a CPU host the two are in flight together but run one after the other: the gain is
an accelerator figure (`expected_speedup`). With ``k = 0`` the update needs the rollout it
trains on, so the two run one after the other, and the step computes what `PPO.train_step`
computes (the same functions, on other devices). Both sides run the same pure functions as `PPO`
(`PPO.sample`, `PPO.train_on`, `PPO.push`), so a split-mesh run with staleness k equals the
single-mesh pipeline with staleness k up to the device count's rounding.

It is a `PPO` (the trainer side) whose `train_step` does the above, so `train(...,
trainer=SplitMeshPPO(...))` logs, checkpoints (the queue included) and resumes it as any run.
Rewards are scored on the sampler mesh, inside the jit (a JAX function or a `RewardModel`); sweeps
and `TextReward` are not supported.

**Timeline.** ``timeline="overlap"`` records, per step, each phase's span on the host's clock:
from its dispatch to the moment its result is ready (``jax.block_until_ready`` in a waiting thread
per phase, so waiting does not serialise the phases): the time each phase is in flight.
``"sequential"`` blocks after each phase instead: the phases' own durations, from which the gain
of the overlap is estimated (`expected_speedup`). ``None`` records nothing and never blocks inside
a step.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import jax
from jax.sharding import Mesh

from jaxrlhf.models.lm import LanguageModel
from jaxrlhf.models.value import ValueModel
from jaxrlhf.sharding import make_mesh, replicated
from jaxrlhf.training import pipeline
from jaxrlhf.training.config import PPOConfig
from jaxrlhf.training.experience import PromptBatch
from jaxrlhf.training.ppo import PPO, Metrics
from jaxrlhf.training.state import FrozenParams, TrainState
from jaxrlhf.tuning import Tuning

TIMELINE_MODES = ("overlap", "sequential")


@dataclasses.dataclass(frozen=True)
class Span:
    """One phase of one step on the host's clock (``time.perf_counter`` seconds): ``phase`` is
    ``"rollout"`` (sampler mesh: sample + score), ``"update"`` (trainer mesh: experience + PPO
    update), or ``"transfer"`` (the new batch to the trainer mesh and into the queue)."""

    phase: str
    step: int
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def split_devices(devices=None, sampler_fraction: float = 0.5) -> tuple[list, list]:
    """``devices`` (default: all) split in two: the first ``sampler_fraction`` for the sampler."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < 2:
        raise ValueError(f"a split mesh needs at least 2 devices, got {len(devices)}")
    n = min(max(1, round(len(devices) * sampler_fraction)), len(devices) - 1)
    return devices[:n], devices[n:]


def sampler_view(state: TrainState) -> TrainState:
    """What sampling reads of a state (step, policy parameters, numbers, key, KL and score
    statistics), without the critic, the optimizer states and the queue: what crosses to the
    sampler mesh each step."""
    return dataclasses.replace(state, value_params={}, policy_opt_state=None, value_opt_state=None, pipeline=None)


class SplitMeshPPO(PPO):
    """`PPO` with the rollout on ``sampler_mesh`` and the update on ``trainer_mesh`` (see the module
    docstring); the state, the frozen parameters and the prompts given to it live on the trainer mesh.

    Args:
      config, policy, reward, critic, tuning: as for `PPO`.
      sampler_devices, trainer_devices: disjoint device lists (e.g. from `split_devices`); each
        becomes a data-parallel mesh (`jaxrlhf.sharding.make_mesh`). Or ``sampler_mesh`` /
        ``trainer_mesh`` directly.
      timeline: None, ``"overlap"`` or ``"sequential"``: record `Span`s in ``self.timeline``.
    """

    def __init__(
        self,
        config: PPOConfig,
        policy: LanguageModel,
        reward: Any,
        *,
        sampler_devices=None,
        trainer_devices=None,
        sampler_mesh: Mesh | None = None,
        trainer_mesh: Mesh | None = None,
        critic: ValueModel | None = None,
        tuning: Tuning | str | None = "auto",
        timeline: str | None = None,
    ):
        if sampler_devices is None or trainer_devices is None:
            sampler_devices, trainer_devices = split_devices()
        sampler_mesh = make_mesh(devices=list(sampler_devices)) if sampler_mesh is None else sampler_mesh
        trainer_mesh = make_mesh(devices=list(trainer_devices)) if trainer_mesh is None else trainer_mesh
        shared = set(sampler_mesh.devices.flat) & set(trainer_mesh.devices.flat)
        if shared:
            raise ValueError(
                f"the sampler and trainer meshes must not share devices, both hold {sorted(map(str, shared))}"
            )
        if timeline is not None and timeline not in TIMELINE_MODES:
            raise ValueError(f"timeline must be None or one of {TIMELINE_MODES}, got {timeline!r}")
        super().__init__(config, policy, reward, critic=critic, mesh=trainer_mesh, tuning=tuning)
        if self.uses_host_reward:
            raise ValueError("the split-mesh trainer scores on the sampler mesh, in the jit: pass a JAX reward")
        self.sampler_side = PPO(config, policy, reward, critic=critic, mesh=sampler_mesh, tuning=tuning)
        self.timeline_mode = timeline
        self.timeline: list[Span] = []
        self._sampler_frozen_cache: tuple[Any, FrozenParams] | None = None
        self._view_shardings = sampler_view(self.sampler_side.state_shardings())

        sampler = self.sampler_side
        self._jit_sample = sampler.tuning.jit(sampler.sample)
        self._jit_fill_queue = sampler.tuning.jit(sampler.filled_queue)
        step_shardings = (self._state_shardings, replicated(self.mesh))
        self._jit_train_on = jax.jit(self.train_on, out_shardings=step_shardings)
        self._jit_train_oldest = jax.jit(self._train_oldest, out_shardings=step_shardings)
        self._jit_push = jax.jit(self.push, out_shardings=self._state_shardings)

    # ------------------------------------------------------------------ moving between meshes

    def _train_oldest(self, state: TrainState, frozen: FrozenParams) -> tuple[TrainState, Metrics]:
        return self.train_on(state, frozen, pipeline.oldest(state.pipeline))

    def _on_sampler(self, state: TrainState, frozen: FrozenParams, batch: PromptBatch):
        """The state's sampling view, the frozen parameters sampling needs (the reward model; with
        LoRA the base) and ``batch``, copied to the sampler mesh."""
        cached = self._sampler_frozen_cache
        if cached is None or cached[0] is not frozen:
            needed = FrozenParams(frozen.ref_params if self.lora is not None else None, frozen.reward_params)
            cached = (frozen, jax.device_put(needed, self.sampler_side.frozen_shardings(needed)))
            self._sampler_frozen_cache = cached
        rows_sharding = self.sampler_side._prompts_sharding(batch.ids.shape[-2], batch_dim=batch.ids.ndim - 2)
        view = jax.device_put(sampler_view(state), self._view_shardings)
        return view, cached[1], jax.device_put(batch, rows_sharding)

    def _to_trainer(self, tree, batch_dim: int = 0):
        """Batch-major arrays from the sampler mesh to the trainer mesh, split like the trainer's batch."""
        shardings = jax.tree.map(lambda x: self._prompts_sharding(x.shape[batch_dim], batch_dim), tree)
        return jax.device_put(tree, shardings)

    # ------------------------------------------------------------------ the step

    def train_step(self, state: TrainState, frozen: FrozenParams, batch: PromptBatch) -> tuple[TrainState, Metrics]:
        """One step: sample ``batch`` (the prompts of step ``state.step + k``) on the sampler mesh with
        the state's parameters while the trainer mesh trains on the oldest batch in flight (k >= 1),
        or then trains on it (k = 0)."""
        watch = _Watch(self.timeline_mode, int(state.step) if self.timeline_mode else -1)
        view, sampler_frozen, sampler_batch = self._on_sampler(state, frozen, batch)
        flight = watch("rollout", lambda: self._jit_sample(view, sampler_frozen, sampler_batch))
        if self.config.max_staleness == 0:
            new_state, metrics = watch("update", lambda: self._jit_train_on(state, frozen, self._to_trainer(flight)))
        else:
            trained, metrics = watch("update", lambda: self._jit_train_oldest(state, frozen))  # while it samples
            new_state = watch("transfer", lambda: self._jit_push(trained, self._to_trainer(flight)))
        self.timeline.extend(watch.spans())
        return new_state, metrics

    def fill_step(self, state: TrainState, frozen: FrozenParams, batches: PromptBatch) -> TrainState:
        """`PPO.fill_step` with the k batches sampled on the sampler mesh."""
        if self.config.max_staleness == 0:
            raise ValueError("fill_step: max_staleness is 0, there is no queue to fill")
        view, sampler_frozen, sampler_batches = self._on_sampler(state, frozen, batches)
        queue = self._jit_fill_queue(view, sampler_frozen, sampler_batches)
        queue = jax.device_put(queue, self.state_shardings().pipeline)
        return dataclasses.replace(state, pipeline=queue)


class _Watch:
    """Times the phases of one step: ``watch(phase, dispatch)`` calls ``dispatch()`` (which returns
    at once: JAX dispatches asynchronously) and notes when its result is ready: ``"sequential"``
    by blocking right there, ``"overlap"`` from a thread started at once that blocks on it (so the
    next phase is dispatched meanwhile, and each end time is its own); None: not at all."""

    def __init__(self, mode: str | None, step: int):
        self.mode, self.step = mode, step
        self._spans: list[Span] = []
        self._threads: list[threading.Thread] = []

    def __call__(self, phase: str, dispatch):
        start = time.perf_counter()
        result = dispatch()
        if self.mode == "sequential":
            jax.block_until_ready(result)
            self._spans.append(Span(phase, self.step, start, time.perf_counter()))
        elif self.mode == "overlap":

            def wait():
                jax.block_until_ready(result)
                self._spans.append(Span(phase, self.step, start, time.perf_counter()))

            thread = threading.Thread(target=wait, daemon=True)
            thread.start()
            self._threads.append(thread)
        return result

    def spans(self) -> list[Span]:
        for thread in self._threads:
            thread.join()
        return sorted(self._spans, key=lambda span: span.start)


def phase_means(spans: list[Span], skip_steps: int = 1) -> dict[str, float]:
    """Mean duration of each phase over the spans of steps ``>= skip_steps`` (the first steps
    compile)."""
    totals: dict[str, list[float]] = {}
    for span in spans:
        if span.step >= skip_steps:
            totals.setdefault(span.phase, []).append(span.duration)
    return {phase: sum(d) / len(d) for phase, d in totals.items()}


def expected_speedup(rollout_s: float, update_s: float, transfer_s: float = 0.0) -> float:
    """The step-time gain of overlapping the phases, from their own durations: a synchronous step
    costs ``rollout + update``, an overlapped one ``max(rollout, update) + transfer``. (What the
    phases cost on their halves of the devices, measured by a ``"sequential"`` timeline.)"""
    return (rollout_s + update_s) / (max(rollout_s, update_s) + transfer_s)
