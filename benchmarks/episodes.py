"""Multi-turn episodes: the environment inside the jitted step vs the same environment on the host.

A calculator task (the policy writes an expression and a closing tag, the tool answers
``= value ;``) is run two ways on the same random-weight model, prompts and key:

- **in the jit**: the JAX-native environment (`jaxrlhf.episodes.run_episodes` under one
  `jax.jit`): prefill, every turn's decode loop, the environment's ``step`` and the observations'
  cache writes are one XLA program (a ``while_loop`` over turns);
- **on the host**: the same environment written in NumPy/Python (`HostEpisodes`): a jitted start,
  then per turn a jitted decode (until every row has ended its turn), the actions copied to the
  host, the environment's ``step`` in Python, the observations copied back and a jitted write:
  ``1 + 2k`` dispatches and ``k`` device -> host -> device round trips for ``k`` turns, the
  device idle while the host works.

Both sides compute the same episodes (checked: identical tokens, column "same"), so they do the
same device work, compiled with the same XLA options (plain `jax.jit`, the model with the
backend's `Tuning`); the difference is the host's part. Rows:

1. **Rollout** at 1, 2, 4, 8 turns (``--turns``): B rows, N = k (A + O) tokens (A-token actions
   ended by the closing tag or the per-turn budget, O-token observations, no EOS), so every
   episode runs k turns. Reported: episode tokens (sampled + observed, the tokens the trainer
   trains on) per second each way, the ratio (in the jit / on the host), and the host's per-turn
   overhead ``(t_host - t_jit) / k``, split into the environment's own ``step`` time and the rest
   (dispatch of the jitted pieces, the round trip's copies and synchronisation, Python); compile
   seconds of each side (first call minus the median; the host side compiles three programs).
2. **RL iteration** (``--iteration_turns``): the whole `PPO` step (``--preset``, GRPO by default)
   with ``environment=`` the JAX-native one (`PPO.train_step`: rollout, rewards and update as one
   program) vs the host one (`PPO.rollout_step`, `score_step`, `update_step`, as `train` runs
   them). Reported: seconds per iteration, episode tokens per second and the ratio.

What bounds each: in the jit, the decode steps (one forward per token; the environment's step is
a few vector operations per turn, fused into the program); on the host, the same plus, per turn,
the dispatches, two copies and a synchronisation (the next turn cannot be queued before the host
has seen this turn's actions) and the environment's Python. So the ratio grows with the turns and
shrinks with the model: on a small model or an accelerator (short decode steps, slow host
synchronisation) the round trips dominate, on a large model on a CPU the decode steps do.

Each pair is timed interleaved (in the jit, on the host, in the jit, ...) ``--reps`` times after
one compile call each; the tables show medians. On a loaded machine absolute figures vary; the
ratios come from interleaved runs.

**Other tasks** (``--task module:function``): ``function()`` returns an object with the attributes
of `Task` (the two environments, the vocabulary, a prompt maker, the per-turn action budget);
``experiments/`` is on the import path, so ``--task tasks.countdown_calc:benchmark_task`` works
once that module defines such a function. The default is this file's toy calculator.

    python benchmarks/episodes.py            # tiny and GPT-2 124M shapes, turns 1 2 4 8, 5 repetitions
    python benchmarks/episodes.py --quick    # tiny shape, turns 1 2, the iteration at 2 turns, 2 repetitions
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Literal

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))  # --task tasks.<name>:<function>
from rollout_engine import table, timed_pair  # noqa: E402
from sampling import GPT2_124M, GPT2_TINY  # noqa: E402

from jaxrlhf.episodes import Environment, StepOutput  # noqa: E402

# ----------------------------------------------------------------------------------------------
# The toy calculator, JAX-native and on the host (the same environment)

PAD, EOS, CLOSE, EQ, SEMI, PLUS, MINUS, TIMES, DIGIT0 = 0, 2, 3, 4, 5, 6, 7, 8, 10
VOCAB = 32  # 20..31: words the calculator ignores
MOD = 10_000  # values are kept mod 10^4: products stay in int32, answers in 4 digits
OBS = 6  # "=", up to 4 digits, ";"


def calculate(tokens) -> int:
    """The calculator on the host: the expression's digits and + - * left to right, mod 10^4
    (other tokens are ignored), as a Python tool would read the text ``12+3*4``."""
    acc, num, op = 0, 0, PLUS
    for token in tokens:
        if DIGIT0 <= token < DIGIT0 + 10:
            num = (num * 10 + token - DIGIT0) % MOD
        elif token in (PLUS, MINUS, TIMES):
            acc, num, op = _apply(op, acc, num), 0, token
    return _apply(op, acc, num)


def _apply(op, a, b):
    return (a + b) % MOD if op == PLUS else (a - b) % MOD if op == MINUS else (a * b) % MOD


def answer_tokens(value: int) -> list[int]:
    return [EQ, *(DIGIT0 + int(c) for c in str(value)), SEMI]


def prompt_target(prompt_ids, prompt_mask):
    """The number the episode should reach: the sum of the prompt's digits (mod 10^4)."""
    digits = (prompt_ids >= DIGIT0) & (prompt_ids < DIGIT0 + 10) & (prompt_mask > 0)
    return (digits * (prompt_ids - DIGIT0)).sum(axis=1) % MOD


@dataclasses.dataclass(frozen=True)
class JaxCalculator(Environment):
    """`calculate` as JAX: a scan over the turn's A action tokens, vmapped over rows by shape;
    the answer written as ``= digits ;``; reward 1 when it equals the prompt's target."""

    max_observation_tokens: int = OBS
    stop_token_ids: tuple[int, ...] = (CLOSE,)
    metric_names: tuple[str, ...] = ("tool_calls",)

    def reset(self, key, prompt_ids, prompt_mask):
        return prompt_target(prompt_ids, prompt_mask).astype("int32")

    def step(self, state, action_ids, action_mask):
        import jax
        import jax.numpy as jnp

        def apply(op, a, b):
            return jnp.where(op == PLUS, (a + b) % MOD, jnp.where(op == MINUS, (a - b) % MOD, (a * b) % MOD))

        def read(carry, token_valid):
            acc, num, op = carry
            token, valid = token_valid
            is_digit = valid & (token >= DIGIT0) & (token < DIGIT0 + 10)
            is_op = valid & ((token == PLUS) | (token == MINUS) | (token == TIMES))
            acc = jnp.where(is_op, apply(op, acc, num), acc)
            num = jnp.where(is_digit, (num * 10 + token - DIGIT0) % MOD, jnp.where(is_op, 0, num))
            return (acc, num, jnp.where(is_op, token, op)), None

        zeros = jnp.zeros(action_ids.shape[:1], jnp.int32)
        (acc, num, op), _ = jax.lax.scan(read, (zeros, zeros, zeros + PLUS), (action_ids.T, action_mask.T > 0))
        value = apply(op, acc, num)
        num_digits = 1 + (value >= 10) + (value >= 100) + (value >= 1000)
        j = jnp.arange(OBS)[None, :]
        power = 10 ** jnp.clip(num_digits[:, None] - j, 0, 3)  # the digit at j is value // 10^(nd - j) % 10
        digit = DIGIT0 + (value[:, None] // power) % 10
        obs = jnp.where(j == 0, EQ, jnp.where(j <= num_digits[:, None], digit, SEMI))
        obs_mask = (j < num_digits[:, None] + 2).astype(jnp.int32)
        reward = (value == state).astype(jnp.float32)
        metrics = {"tool_calls": jnp.ones_like(reward)}
        return StepOutput(
            state, jnp.where(obs_mask > 0, obs, PAD), obs_mask, reward, jnp.zeros_like(reward, bool), metrics
        )


@dataclasses.dataclass(frozen=True)
class HostCalculator(Environment):
    """The same calculator on the host: per row, the action's tokens read by `calculate` in
    Python, the answer's tokens written into NumPy arrays."""

    max_observation_tokens: int = OBS
    stop_token_ids: tuple[int, ...] = (CLOSE,)
    metric_names: tuple[str, ...] = ("tool_calls",)
    on_host: bool = True

    def reset(self, key, prompt_ids, prompt_mask):
        return prompt_target(np.asarray(prompt_ids), np.asarray(prompt_mask)).tolist()

    def step(self, state, action_ids, action_mask):
        B = action_ids.shape[0]
        obs, obs_mask, reward = np.zeros((B, OBS), np.int32), np.zeros((B, OBS), np.int32), np.zeros(B, np.float32)
        for b in range(B):
            value = calculate(action_ids[b][action_mask[b] > 0].tolist())
            answer = answer_tokens(value)
            obs[b, : len(answer)], obs_mask[b, : len(answer)] = answer, 1
            reward[b] = float(value == state[b])
        return StepOutput(state, obs, obs_mask, reward, np.zeros(B, bool), {"tool_calls": np.ones(B, np.float32)})


@dataclasses.dataclass(frozen=True)
class Task:
    """What the benchmark needs of a task (another task's ``--task`` function returns an object
    with these attributes)."""

    name: str
    jax_env: Environment  # JAX-native (on_host False)
    host_env: Environment  # the same environment on the host (on_host True)
    vocab_size: int
    prompts: Callable[[int, int], tuple[np.ndarray, np.ndarray]]  # (rows, seed) -> left-padded ids, mask [rows, P]
    turn_tokens: int  # A: the per-turn action budget


def calculator_prompts(rows: int, seed: int, prompt_len: int = 16):
    """Left-padded prompts of prompt_len / 2 .. prompt_len tokens drawn from the calculator's
    vocabulary (digits, operators, words)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_len // 2, prompt_len + 1, size=rows)
    ids = rng.integers(PLUS, VOCAB, size=(rows, prompt_len)).astype(np.int32)
    mask = (np.arange(prompt_len)[None, :] >= prompt_len - lengths[:, None]).astype(np.int32)
    return ids * mask, mask


def toy_calculator() -> Task:
    return Task("toy-calculator", JaxCalculator(), HostCalculator(), VOCAB, calculator_prompts, turn_tokens=8)


def load_task(spec: str):
    if not spec:
        return toy_calculator()
    module, _, function = spec.partition(":")
    if not function:
        raise SystemExit(f"--task must be module:function, got {spec!r}")
    return getattr(importlib.import_module(module), function)()


class TimedEnv(Environment):
    """A host environment whose ``step`` time and calls are counted (everything else is the
    environment's)."""

    on_host = True

    def __init__(self, env: Environment):
        self.env, self.seconds, self.calls = env, 0.0, 0
        self.max_observation_tokens, self.stop_token_ids = env.max_observation_tokens, env.stop_token_ids
        self.metric_names = env.metric_names

    @property
    def name(self) -> str:
        return self.env.name

    def reset(self, key, prompt_ids, prompt_mask):
        return self.env.reset(key, prompt_ids, prompt_mask)

    def step(self, state, action_ids, action_mask):
        start = time.perf_counter()
        out = self.env.step(state, action_ids, action_mask)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


# ----------------------------------------------------------------------------------------------
# Cases

MODELS = {
    # The small-model regime of RLHF research, and a GPT-2 124M-shaped model (the task's vocabulary).
    "tiny": (dict(GPT2_TINY, n_positions=512), 64),
    "gpt2-124m": (GPT2_124M, 16),
}
ModelName = Literal[tuple(MODELS)]  # an unknown name is a command-line error


@dataclasses.dataclass(frozen=True)
class Config:
    """The environment in the jitted step vs on the host (see the module docstring of
    benchmarks/episodes.py for what is timed)."""

    quick: bool = False
    """Tiny shape, 16 rows, turns 1 2, the iteration at 2 turns, at most 2 repetitions."""
    models: tuple[ModelName, ...] = ("tiny", "gpt2-124m")
    """Model shapes (random weights, the task's vocabulary)."""
    turns: tuple[int, ...] = (1, 2, 4, 8)
    """Turns per episode of the rollout rows."""
    iteration_turns: tuple[int, ...] = (1, 8)
    """Turns per episode of the RL-iteration rows (empty: none)."""
    rows: int = 0
    """Episodes per rollout (0: 64 for tiny, 16 for gpt2-124m)."""
    reps: int = 5
    """Timed repetitions of each side (interleaved; the median is reported)."""
    preset: str = "grpo"
    """The RL iteration's algorithm (`jaxrlhf.training.presets`)."""
    group: int = 4
    """Responses per prompt of a group preset (num_generations)."""
    task: str = ""
    """module:function returning a Task-like object (empty: the toy calculator)."""


def resolve(config: Config) -> Config:
    if not config.quick:
        return config
    return dataclasses.replace(
        config, models=("tiny",), turns=(1, 2), iteration_turns=(2,), rows=config.rows or 16, reps=min(config.reps, 2)
    )


def build(model_name: str, vocab_size: int):
    import jax

    from jaxrlhf.models import LanguageModel, ModelConfig

    hf = dict(MODELS[model_name][0], vocab_size=vocab_size, model_type="gpt2")
    config = ModelConfig.from_hf(dict(hf, pad_token_id=PAD, bos_token_id=None, eos_token_id=None))
    model = LanguageModel(config)
    return model, model.init_params(jax.random.PRNGKey(0))


def run_rollout(task, model_name: str, rows: int, turns: int, reps: int) -> dict:
    import jax

    from jaxrlhf.episodes import EpisodeSettings, HostEpisodes, run_episodes
    from jaxrlhf.tuning import Tuning, model_width

    model, params = build(model_name, task.vocab_size)
    model = model.with_tuning(Tuning.for_backend(rows_per_device=rows, width=model_width(model)))
    A, O = task.turn_tokens, task.jax_env.max_observation_tokens
    N = turns * (A + O)
    ids, mask = task.prompts(rows, 0)
    key = jax.random.key(1)
    in_jit = jax.jit(
        lambda p, i, m, k: run_episodes(
            model, p, i, m, k, task.jax_env, max_new_tokens=N, max_turns=turns, max_turn_tokens=A
        )
    )
    host_env = TimedEnv(task.host_env)
    on_host = HostEpisodes(model, host_env, EpisodeSettings(N, turns, A), vocab_size=task.vocab_size)
    out = {}

    def run_jit():
        out["jit"] = jax.block_until_ready(in_jit(params, ids, mask, key))

    def run_host():
        out["host"] = jax.block_until_ready(on_host(params, ids, mask, key))

    warm = []
    jit_s, host_s = timed_pair(run_jit, run_host, reps, warm)
    env_s_per_rollout = host_env.seconds / (reps + 1)
    steps = host_env.calls / (reps + 1)
    jit_out, host_out = jax.device_get((out["jit"], out["host"]))
    tokens = float(np.sum(jit_out.mask))
    return dict(
        case=f"{model_name}-k{turns}",
        rows=rows,
        turns=turns,
        new_tokens=N,
        mean_turns=float(np.mean(jit_out.episode_stats["turns"])),
        tokens=tokens,
        same=bool(np.array_equal(jit_out.tokens, host_out.tokens) and np.array_equal(jit_out.mask, host_out.mask)),
        jit_tok_s=tokens / jit_s,
        host_tok_s=tokens / host_s,
        ratio=host_s / jit_s,
        jit_turn_ms=1e3 * jit_s / steps,
        overhead_ms=1e3 * (host_s - jit_s) / steps,
        env_ms=1e3 * env_s_per_rollout / steps,
        dispatches=1 + 2 * steps,
        compile_s=f"{warm[0] - jit_s:.1f} / {warm[1] - host_s:.1f}",
    )


def run_iteration(task, model_name: str, rows: int, turns: int, reps: int, preset_name: str, group: int) -> dict:
    import jax

    from jaxrlhf.training import PPO, PPOConfig
    from jaxrlhf.training.presets import preset

    model, params = build(model_name, task.vocab_size)
    A, O = task.turn_tokens, task.jax_env.max_observation_tokens
    ids, mask = task.prompts(rows, 0)
    base = PPOConfig(
        batch_size=rows,
        minibatch_size=rows,
        ppo_epochs=1,
        max_prompt_len=ids.shape[1],
        max_new_tokens=turns * (A + O),
        max_turns=turns,
        max_turn_tokens=A,
        eos_token_id=-1,  # no EOS: every episode runs its turns
        kl_coef=0.01,
        total_steps=10_000,
    )
    config = preset(preset_name, base, **({"num_generations": group} if preset_name not in ("ppo", "remax") else {}))
    sides = {}
    for side, env in (("jit", task.jax_env), ("host", task.host_env)):
        ppo = PPO(config, model, None, environment=env)
        state, frozen = ppo.init_state(params), ppo.frozen_params(params)
        batch = ppo.prompt_batch(ids[: config.prompts_per_step], mask[: config.prompts_per_step])
        sides[side] = dict(ppo=ppo, state=state, frozen=frozen, batch=batch)
    tokens = {"jit": [], "host": []}

    def run(side):
        s = sides[side]
        ppo, state, frozen, batch = s["ppo"], s["state"], s["frozen"], s["batch"]
        if side == "jit":
            state, metrics = ppo.train_step(state, frozen, batch)
        else:
            rollout_out = ppo.rollout_step(state, frozen, batch)
            scores = ppo.score_step(frozen, batch, rollout_out)
            state, metrics = ppo.update_step(state, frozen, batch, rollout_out, scores)
        s["state"] = state
        # Episode tokens (the mean row's mask sum, times the rows); reading it blocks on the step.
        tokens[side].append(float(jax.device_get(metrics["response_length"])) * config.rollout_size)

    warm = []
    jit_s, host_s = timed_pair(lambda: run("jit"), lambda: run("host"), reps, warm)
    return dict(
        case=f"{model_name}-k{turns}",
        rows=config.rollout_size,
        turns=turns,
        jit_s=jit_s,
        host_s=host_s,
        jit_tok_s=statistics.median(tokens["jit"]) / jit_s,
        host_tok_s=statistics.median(tokens["host"]) / host_s,
        ratio=host_s / jit_s,
        compile_s=f"{warm[0] - jit_s:.1f} / {warm[1] - host_s:.1f}",
    )


def main(argv=None):
    from jaxrlhf.config import parse_config

    args = resolve(parse_config(Config, argv))
    for field in ("turns", "iteration_turns"):
        if any(k < 1 for k in getattr(args, field)):
            raise SystemExit(f"--{field} must be turn counts >= 1, got {getattr(args, field)}")
    task = load_task(args.task)

    import jax

    print(
        f"jax {jax.__version__} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs, task {task.name}, "
        f"median of {args.reps} interleaved repetitions, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    A, O = task.turn_tokens, task.jax_env.max_observation_tokens
    table(
        f"\nrollout: episode tokens (sampled + observed) per second, A = {A}-token actions, O = {O}-token "
        "observations, N = k (A + O); per turn: jit ms = t_jit / turns, +host ms = (t_host - t_jit) / turns, "
        "env ms = the host environment's step (part of +host); calls = jitted dispatches on the host side",
        f"{'case':<16} {'B':>4} {'N':>4} {'turns':>5} {'tokens':>7} {'jit tok/s':>10} {'host tok/s':>10} "
        f"{'ratio':>6} {'jit ms':>7} {'+host ms':>8} {'env ms':>7} {'calls':>5} {'compile s jit/host':>18} "
        f"{'same':>5}",
        [(m, k) for m in args.models for k in args.turns],
        lambda case: run_rollout(task, case[0], args.rows or MODELS[case[0]][1], case[1], args.reps),
        lambda case, r: (
            f"{r['case']:<16} {r['rows']:>4} {r['new_tokens']:>4} {r['mean_turns']:>5.1f} {r['tokens']:>7.0f} "
            f"{r['jit_tok_s']:>10.0f} {r['host_tok_s']:>10.0f} {r['ratio']:>5.2f}x {r['jit_turn_ms']:>7.2f} "
            f"{r['overhead_ms']:>8.2f} {r['env_ms']:>7.2f} {r['dispatches']:>5.0f} {r['compile_s']:>18} "
            f"{'yes' if r['same'] else 'NO':>5}"
        ),
    )
    table(
        f"\nRL iteration ({args.preset}): PPO.train_step (environment in the jit) vs rollout_step + "
        "score_step + update_step (environment on the host)",
        f"{'case':<16} {'B':>4} {'turns':>5} {'jit s':>7} {'host s':>7} {'jit tok/s':>10} {'host tok/s':>10} "
        f"{'ratio':>6} {'compile s jit/host':>18}",
        [(m, k) for m in args.models for k in args.iteration_turns],
        lambda case: run_iteration(
            task, case[0], args.rows or MODELS[case[0]][1], case[1], args.reps, args.preset, args.group
        ),
        lambda case, r: (
            f"{r['case']:<16} {r['rows']:>4} {r['turns']:>5} {r['jit_s']:>7.3f} {r['host_s']:>7.3f} "
            f"{r['jit_tok_s']:>10.0f} {r['host_tok_s']:>10.0f} {r['ratio']:>5.2f}x {r['compile_s']:>18}"
        ),
    )
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
