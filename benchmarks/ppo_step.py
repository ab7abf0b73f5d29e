"""Seconds per PPO iteration: jaxrlhf's jitted step vs a TRL-style (pre-1.0) PyTorch loop (issue #5).

Both sides run the same weights: a random-weight GPT-2 is built with transformers from a
`GPT2Config` (dropout off), saved with `save_pretrained` to a temporary directory and loaded with
`jaxrlhf.load_pretrained`. Policy, reference (= initial policy) and a separate critic (a copy of
the trunk + the same random value head) start equal in both frameworks. One iteration:

    rollout      sample --new-tokens tokens per prompt (temperature 1, no top-k/top-p, KV cache,
                 no EOS so every row has the full length)
    experience   programmatic reward; policy, reference and critic forwards over prompt + response;
                 k1 KL-penalised step rewards (beta 0.05); GAE (gamma 1, gae_lambda 0.95); whitening
    update       1 PPO epoch x --minibatches minibatches: clipped policy + value loss, grad-norm
                 clip, AdamW on policy and critic

jaxrlhf is timed twice per iteration: the fused step (`PPO.bind(frozen, donate=True)`: one
`jax.jit` for the whole iteration, the number that counts) and the same step split into three
separately jitted phases (`PPO.rollout_step`, `make_experience`, `make_ppo_update`) for the
breakdown. The torch baseline is `benchmarks/torch_ppo_baseline.py`. Both run in one process and
alternate in blocks of --block iterations (default 1); at each switch the framework leaving frees
its training state and the one coming in rebuilds it (untimed), so the two never hold their ~3-4 GB
(GPT-2 124M) at the same time. After one warm-up iteration each (jaxrlhf's compiles, reported
separately) the table shows medians of --iters iterations. torch runs with
`torch.set_num_threads(os.cpu_count())`; XLA uses all cores by default.

    python benchmarks/ppo_step.py                       # GPT-2 124M, batch 16, 32 + 32 tokens
    python benchmarks/ppo_step.py --batch 32 --new-tokens 64 --minibatches 4
    python benchmarks/ppo_step.py --quick               # tiny model, checks that it runs (< 1 min)
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import statistics
import sys
import tempfile
import time
from typing import Literal

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODELS = {
    # GPT-2 small: 124M parameters, 50257-token vocabulary, 12 layers of width 768.
    "gpt2-124m": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
    # The small-model regime of RLHF research (e.g. randomwalks): 2 layers, width 64, 64 tokens.
    "tiny": dict(vocab_size=64, n_positions=128, n_embd=64, n_layer=2, n_head=4),
}
PHASES = ("rollout", "experience", "update")


@dataclasses.dataclass(frozen=True)
class Config:
    """Seconds per PPO iteration: jaxrlhf's jitted step vs a TRL-style PyTorch loop, same weights
    (see the module docstring of benchmarks/ppo_step.py for what is timed)."""

    quick: bool = False
    """Tiny model, 16 new tokens, 2 iterations, no phase split: checks that it runs."""
    model: Literal[tuple(MODELS)] | None = None
    """Model shape (None: gpt2-124m, tiny with --quick)."""
    batch: int = 16
    """Prompts (= responses) per iteration."""
    prompt_len: int = 32
    """Prompt length (left-padded, half to all of it real tokens)."""
    new_tokens: int | None = None
    """Sampled tokens per response (None: 32, 16 with --quick)."""
    minibatches: int = 2
    """Minibatches of the one PPO epoch; must divide batch."""
    iters: int | None = None
    """Timed iterations per side (None: 5, 2 with --quick)."""
    block: int = 1
    """Iterations per framework before switching to the other (each switch rebuilds the training
    state, so only one framework's state is in memory at a time)."""
    threads: int = os.cpu_count() or 1
    """torch.set_num_threads."""
    split: bool | None = None
    """Also time jaxrlhf's three phases as separate jits (None: on, off with --quick)."""
    verbose: bool = False
    """Print every iteration."""


def resolve(config: Config) -> Config:
    """The config with every None default filled in (they depend on --quick), checked."""
    config = dataclasses.replace(
        config,
        model=config.model or ("tiny" if config.quick else "gpt2-124m"),
        new_tokens=config.new_tokens or (16 if config.quick else 32),
        iters=config.iters or (2 if config.quick else 5),
        split=(not config.quick) if config.split is None else config.split,
    )
    if config.batch % config.minibatches:
        sys.exit(f"--minibatches ({config.minibatches}) must divide --batch ({config.batch})")
    return config


def build_checkpoint(model_name: str, directory: str, seed: int = 0):
    """Random-weight GPT-2 (HF) saved to `directory`; returns the torch policy and a value head."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        **MODELS[model_name],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    policy = transformers.GPT2LMHeadModel(config)
    policy.generation_config.eos_token_id = None
    policy.generation_config.pad_token_id = 0
    policy.save_pretrained(directory)
    head = torch.nn.Linear(config.n_embd, 1)
    torch.nn.init.normal_(head.weight, std=0.1 / config.n_embd**0.5)
    torch.nn.init.zeros_(head.bias)
    return policy, head


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0):
    """Left-padded prompts with lengths between prompt_len / 2 and prompt_len."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_len // 2, prompt_len + 1, size=batch)
    ids = rng.integers(1, vocab, size=(batch, prompt_len)).astype(np.int32)
    mask = (np.arange(prompt_len)[None, :] >= prompt_len - lengths[:, None]).astype(np.int32)
    return ids * mask, mask


def jax_reward(prompt_ids, prompt_mask, response_ids, response_mask):
    """Fraction of valid response tokens with an even id (a cheap programmatic reward)."""
    import jax.numpy as jnp

    even = (response_ids % 2 == 0).astype(jnp.float32) * response_mask
    return even.sum(1) / jnp.maximum(response_mask.sum(1), 1)


def torch_reward(prompt_ids, prompt_mask, response_ids, response_mask):
    even = (response_ids % 2 == 0).float() * response_mask
    return even.sum(1) / response_mask.sum(1).clamp(min=1)


class JaxSide:
    """jaxrlhf's PPO: the fused jitted step, and the same step as three jitted phases.

    The compiled programs live as long as this object; the training state (3 GB for GPT-2 124M:
    two models and their Adam moments) only between `reset` and `free`, so the two frameworks
    never hold their training state in memory at the same time.
    """

    def __init__(self, pretrained, head, args):
        import jax

        from jaxrlhf.models import ValueModel
        from jaxrlhf.training import PPO, PPOConfig, make_experience, make_ppo_update

        self.jax = jax
        model, self.params = pretrained.model, pretrained.params
        self.head = {
            "kernel": jax.numpy.asarray(head.weight.detach().numpy().T),
            "bias": jax.numpy.asarray(head.bias.detach().numpy()),
        }
        config = PPOConfig(
            total_steps=1000,
            batch_size=args.batch,
            minibatch_size=args.batch // args.minibatches,
            ppo_epochs=1,
            max_new_tokens=args.new_tokens,
            max_prompt_len=args.prompt_len,
            temperature=1.0,
            top_k=None,
            top_p=1.0,
            eos_token_id=-1,
            kl_coef=0.05,
            kl_estimator="k1",
            gamma=1.0,
            gae_lambda=0.95,
            clip_eps=0.2,
            value_clip_eps=0.2,
            vf_coef=0.1,
            learning_rate=1e-5,
            critic_learning_rate=1e-5,
            max_grad_norm=1.0,
        )
        self.ppo = ppo = PPO(config, model, jax_reward, critic=ValueModel(model.config))
        self.frozen = ppo.frozen_params(ref_params=self.params)
        ids, mask = make_prompts(args.batch, args.prompt_len, model.config.vocab_size)
        self.batch = ppo.prompt_batch(ids, mask)
        # The state is donated to the step (XLA reuses its buffers for the new state).
        self.train_step = ppo.bind(self.frozen, donate=True)
        self.state = None

        def experience(state, frozen, batch, rollout_out):
            raw = jax_reward(batch.ids, batch.mask, rollout_out.tokens, rollout_out.mask)
            exp, score_stats, _ = make_experience(
                config,
                ppo.models,
                state.policy_params,
                state.value_params,
                frozen.ref_params,
                batch,
                rollout_out,
                raw,
                state.kl_ctl.kl_coef,
                state.score_stats,
                state.hparams,
            )
            return exp, score_stats

        ppo_update = make_ppo_update(config, ppo.models, ppo.policy_optimizer, ppo.value_optimizer)

        def update(state, exp, score_stats):
            _, update_key, next_key = jax.random.split(state.key, 3)
            params = {"policy": state.policy_params, "value": state.value_params}
            opt_states = {"policy": state.policy_opt_state, "value": state.value_opt_state}
            params, opt_states, _ = ppo_update(params, opt_states, exp, state.kl_ctl.kl_coef, state.hparams, update_key)
            return state.replace(
                step=state.step + 1,
                policy_params=params["policy"],
                value_params=params["value"],
                policy_opt_state=opt_states["policy"],
                value_opt_state=opt_states["value"],
                score_stats=score_stats,
                key=next_key,
            )

        self.experience = jax.jit(experience)
        self.update = jax.jit(update, donate_argnums=0)
        self.num_params = sum(x.size for x in jax.tree.leaves(self.params))

    def reset(self):
        value_params = {"trunk": self.jax.tree.map(lambda x: x.copy(), self.params), "head": self.head}
        self.state = self.jax.block_until_ready(self.ppo.init_state(self.params, value_params))

    def free(self):
        self.state = None
        gc.collect()

    def fused(self) -> float:
        start = time.perf_counter()
        self.state, metrics = self.train_step(self.state, self.batch)
        self.jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start

    def split(self) -> dict:
        block = self.jax.block_until_ready
        t0 = time.perf_counter()
        rollout_out = block(self.ppo.rollout_step(self.state, self.frozen, self.batch))
        t1 = time.perf_counter()
        exp, score_stats = block(self.experience(self.state, self.frozen, self.batch, rollout_out))
        t2 = time.perf_counter()
        self.state = block(self.update(self.state, exp, score_stats))
        t3 = time.perf_counter()
        return {"rollout": t1 - t0, "experience": t2 - t1, "update": t3 - t2}


class TorchSide:
    """The TRL-style baseline, rebuilt from the checkpoint for each block (and freed after it)."""

    def __init__(self, directory, head, args):
        import torch

        self.torch, self.directory, self.head, self.args = torch, directory, head, args
        ids, mask = make_prompts(args.batch, args.prompt_len, MODELS[args.model]["vocab_size"])
        self.ids, self.mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        self.ppo = None

    def reset(self):
        import transformers
        from torch_ppo_baseline import Critic, TorchPPO, TorchPPOSettings

        policy = transformers.GPT2LMHeadModel.from_pretrained(self.directory)
        critic = Critic(transformers.GPT2Model(policy.config), self.torch.nn.Linear(policy.config.n_embd, 1))
        critic.trunk.load_state_dict(policy.transformer.state_dict())
        critic.head.load_state_dict(self.head.state_dict())
        settings = TorchPPOSettings(
            max_new_tokens=self.args.new_tokens, minibatch_size=self.args.batch // self.args.minibatches
        )
        self.ppo = TorchPPO(policy, critic, torch_reward, settings)

    def free(self):
        self.ppo = None
        gc.collect()

    def step(self) -> dict:
        return self.ppo.step(self.ids, self.mask)


def run(args) -> dict:
    import jaxrlhf

    with tempfile.TemporaryDirectory() as directory:
        head = build_checkpoint(args.model, directory)[1]  # the torch policy is rebuilt per block
        pretrained = jaxrlhf.load_pretrained(directory)
        jax_side = JaxSide(pretrained, head, args)
        torch_side = TorchSide(directory, head, args)
        del pretrained

        fused, split, torch_times = [], {p: [] for p in PHASES}, {p: [] for p in PHASES}
        compile_fused = compile_split = float("nan")
        loads = [os.getloadavg()[0]]
        done = 0
        for block in range(-(-args.iters // args.block) + 1):
            # Block 0 is the warm-up (jaxrlhf compiles; torch's first step). Blocks alternate
            # which framework goes first, so slow spells of the shared machine hit both.
            warm_up = block == 0
            count = 1 if warm_up else min(args.block, args.iters - done)
            for side in ("jax", "torch") if block % 2 == 0 else ("torch", "jax"):
                if side == "jax":
                    jax_side.reset()
                    for _ in range(count):
                        t_fused = jax_side.fused()
                        t_split = jax_side.split() if args.split else {}
                        if warm_up:
                            compile_fused, compile_split = t_fused, sum(t_split.values())
                        else:
                            fused.append(t_fused)
                            for p, t in t_split.items():
                                split[p].append(t)
                    jax_side.free()
                else:
                    torch_side.reset()
                    for _ in range(count):
                        times = torch_side.step()
                        for p, t in [] if warm_up else times.items():
                            torch_times[p].append(t)
                    torch_side.free()
                loads.append(os.getloadavg()[0])
            if not warm_up:
                done += count
            if args.verbose:
                i = len(fused) - 1
                last = (lambda d: sum(d[p][-1] for p in PHASES)) if i >= 0 else (lambda d: float("nan"))
                print(
                    f"  block {block}{' (warm-up)' if warm_up else ''}: jaxrlhf fused "
                    f"{compile_fused if warm_up else fused[-1]:.2f}s, split "
                    f"{compile_split if warm_up else (last(split) if args.split else float('nan')):.2f}s, "
                    f"torch {sum(times.values()) if warm_up else last(torch_times):.2f}s, "
                    f"load {loads[-1]:.1f}",
                    flush=True,
                )

    med = statistics.median
    n = len(fused)
    if not args.split:  # phases not measured: NaN in the table
        split = {p: [float("nan")] * n for p in PHASES}
    jax_totals = [sum(split[p][i] for p in PHASES) for i in range(n)]
    torch_totals = [sum(torch_times[p][i] for p in PHASES) for i in range(n)]
    return dict(
        num_params=jax_side.num_params,
        jax={p: med(v) for p, v in split.items()} | {"total": med(jax_totals), "fused": med(fused)},
        torch={p: med(v) for p, v in torch_times.items()} | {"total": med(torch_totals)},
        compile_fused=compile_fused - med(fused),
        compile_split=compile_split - med(jax_totals),
        loads=loads,
    )


def main(argv=None):
    from jaxrlhf.config import parse_config

    args = resolve(parse_config(Config, argv))

    import jax
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    print(f"PPO step benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"(torch.set_num_threads({args.threads})), transformers {transformers.__version__}, "
        f"{os.cpu_count()} CPUs, load average {load_start[0]:.1f} {load_start[1]:.1f} {load_start[2]:.1f}"
    )
    print(
        f"model {args.model}, batch {args.batch}, prompt {args.prompt_len} (left-padded, 16-32 real), "
        f"{args.new_tokens} new tokens, 1 epoch x {args.minibatches} minibatches of {args.batch // args.minibatches}, "
        f"float32, median of {args.iters} interleaved iterations",
        flush=True,
    )

    r = run(args)
    rows = [
        ("rollout", "rollout"),
        ("score + experience", "experience"),
        ("update", "update"),
        ("sum of phases", "total"),
    ]
    header = f"{'phase (s / iteration)':<26} {'jaxrlhf':>9} {'torch':>9} {'torch/jax':>10}"
    print(f"params {r['num_params'] / 1e6:.1f}M per model")
    print(header)
    print("-" * len(header))
    for label, key in rows:
        j, t = r["jax"][key], r["torch"][key]
        print(f"{label:<26} {j:>9.3f} {t:>9.3f} {t / j:>9.2f}x")
    fused, torch_total = r["jax"]["fused"], r["torch"]["total"]
    print(f"{'iteration (fused jit)':<26} {fused:>9.3f} {torch_total:>9.3f} {torch_total / fused:>9.2f}x")
    print("-" * len(header))
    print(
        f"jaxrlhf compile (not in the times above): fused step {r['compile_fused']:.1f} s, "
        f"three split phases {r['compile_split']:.1f} s"
    )
    print(f"load average (1 min) during the timed iterations: min {min(r['loads']):.1f}, max {max(r['loads']):.1f}")
    print(f"ratio (torch / jaxrlhf) per PPO iteration: {torch_total / fused:.2f}x")


if __name__ == "__main__":
    main()
