"""The experience pass and the PPO update with and without packing, at the same data.

A batch of B responses with long-tailed lengths (geometric, mean ``N / 4``, capped at the budget
N; prompts of uniform length in [P / 4, P]) is built once with random token ids; the same
`Experience` is then scored and trained on by two compiled programs that differ only in
``PPOConfig.max_tokens_per_microbatch``:

    unpacked   every forward over [rows, P + N], padding included (today's default)
    packed     the rows' real tokens in micro-batches of ``max_tokens`` (`jaxrlhf.training.packed`)

Reported per phase (experience: policy + reference + critic forwards; update: ``ppo_epochs``
passes of minibatch gradients and AdamW steps): medians of interleaved repetitions, the padding
fraction of the unpacked layout and of the packed micro-batches, and the *ideal* ratio: the
matmul FLOPs of the unpacked pass over the packed pass's, which is what the speed-up would be if
time followed them exactly. Each pass counts its trunks at every position it computes (unpacked
``B (P + N)``; packed, whole micro-batches of packs; the attention at ``T = P + N`` keys per
position both ways) and its vocabulary heads (``2 D V`` per position) where they run: unpacked at
the ``B N`` response slots, packed at each micro-batch's response tokens rounded up to whole
chunks (`jaxrlhf.training.packed.response_head`). Experience: 3 trunks (policy, reference,
critic) and 2 heads; update: 2 trunks and 1 head (forward and backward scale both sides alike).
The update packs each minibatch on its own: counted for the minibatches it draws (the permutation
of its epoch key, `update_minibatches`), so its ideal varies with the key and is often below the
experience pass's (each minibatch rounds up to whole micro-batches). The gap between the measured and the
ideal ratio is the packing's own cost (layout, gathers, the loops) and what packing does not
shrink (the AdamW step, the elementwise work).

    python benchmarks/packed_update.py                       # tiny GPT-2 and GPT-2 124M shapes
    python benchmarks/packed_update.py --models gpt2-124m --reps 5
    python benchmarks/packed_update.py --quick               # tiny shapes, one repetition
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # ppo_step's FLOP counts


@dataclasses.dataclass(frozen=True)
class Args:
    """Experience pass and update, packed vs unpacked, on long-tailed response lengths."""

    models: tuple[str, ...] = ("tiny", "gpt2-124m")
    """Model shapes: "tiny" (6 layers x 144, vocabulary 64) and "gpt2-124m" (12 x 768, 50257)."""
    batch: int = 16
    """Responses per step (B)."""
    prompt_len: int = 32
    """Prompt budget P (prompts are 25-100% of it)."""
    new_tokens: int = 128
    """Response budget N; lengths are geometric with mean N / 4, capped at N."""
    max_tokens: int = 2 * (32 + 128)
    """Packed micro-batch budget (tokens); 2 packs of P + N. The update packs each minibatch on its
    own, rounded up to whole micro-batches: smaller micro-batches round less (ideal update 1.7x
    here against 1.4x with 4 packs) at the cost of more, smaller forwards."""
    reps: int = 3
    """Interleaved repetitions; medians reported."""
    seed: int = 0
    quick: bool = False
    """Tiny shapes, B = 8, P = 8, N = 32, one repetition: checks that it runs."""


def model_config(name: str):
    from jaxrlhf.models import ModelConfig

    sizes = {"tiny": (64, 144, 6, 4, 576), "gpt2-124m": (50257, 768, 12, 12, 3072)}[name]
    vocab, width, layers, heads, mlp = sizes
    return ModelConfig(
        model_type="gpt2", vocab_size=vocab, hidden_size=width, num_layers=layers, num_heads=heads,
        num_kv_heads=heads, head_dim=width // heads, intermediate_size=mlp, max_position_embeddings=1024,
        positions="learned", norm="layernorm", mlp="plain", activation="gelu_new", qkv_bias=True, o_bias=True,
        mlp_bias=True, tie_word_embeddings=True, norm_eps=1e-5,
    )  # fmt: skip


def long_tailed_batch(B: int, P: int, N: int, vocab: int, seed: int):
    """Prompts (left-padded, 25-100 % of P) and responses with geometric lengths, mean N / 4."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(max(1, P // 4), P + 1, B)
    prompt_mask = (np.arange(P)[None] >= P - prompt_len[:, None]).astype(np.int32)
    response_len = np.minimum(rng.geometric(4.0 / N, B), N)
    response_mask = (np.arange(N)[None] < response_len[:, None]).astype(np.int32)
    prompt_ids = rng.integers(1, vocab, (B, P)) * prompt_mask
    response_ids = rng.integers(1, vocab, (B, N)) * response_mask
    return prompt_ids, prompt_mask, response_ids, response_mask


def position_flops(config, pack_len: int) -> tuple[int, int]:
    """Matmul FLOPs per position: ``(trunk, vocabulary head)``, `ppo_step.forward_flops` of one
    token with the trunk's attention over ``pack_len`` keys (the unpacked rows and the packs are
    both that long), the head apart (``2 V D``)."""
    import jax
    from ppo_step import forward_flops, model_shape

    from jaxrlhf.models import LanguageModel

    model = LanguageModel(config)
    shape = model_shape(model, jax.eval_shape(model.init_params, jax.random.key(0)))
    trunk = forward_flops(shape, rows=1, length=1, logit_positions=0, keys=pack_len)
    return int(trunk), 2 * shape.head_weights


def packed_positions(prompt_mask, response_mask, max_tokens: int) -> tuple[int, int, int]:
    """``(trunk positions, head positions, micro-batches)`` of the packed passes over these rows:
    whole micro-batches of packs; each micro-batch's response tokens rounded up to whole chunks
    of the response head."""
    import jax.numpy as jnp

    from jaxrlhf.training import packed

    B, P = prompt_mask.shape
    N = response_mask.shape[1]
    batch = packed.pack_batch(jnp.zeros((B, P), jnp.int32), jnp.asarray(prompt_mask),
                              jnp.zeros((B, N), jnp.int32), jnp.asarray(response_mask), max_tokens)  # fmt: skip
    R, T = batch.geometry.packs_per_micro, batch.geometry.pack_len
    chunk = -(-(R * T) // packed.HEAD_CHUNKS)
    micro = int(batch.num_micro)
    targets = [int(jnp.sum(batch.response_targets(i))) for i in range(micro)]
    return micro * R * T, sum(-(-n // chunk) * chunk for n in targets), micro


def update_minibatches(key, batch: int, minibatch: int, epochs: int) -> list:
    """The rows of each minibatch `make_ppo_update` trains on with ``key``: per epoch (its key
    from ``split(key, epochs)``), ``permutation(epoch_key, batch)`` cut into minibatches."""
    import jax
    import numpy as np

    rows = []
    for epoch_key in jax.random.split(key, epochs):
        perm = np.asarray(jax.random.permutation(epoch_key, batch))
        rows += [perm[i : i + minibatch] for i in range(0, batch, minibatch)]
    return rows


def token_counts(prompt_mask, response_mask, max_tokens: int, model_config, minibatches: list) -> dict:
    """Tokens each layout computes and the ideal (FLOP) ratio of each phase (module docstring);
    ``minibatches``: the update's rows of each minibatch (`update_minibatches`)."""
    B, P = prompt_mask.shape
    N = response_mask.shape[1]
    real = int(prompt_mask.sum() + response_mask.sum())
    tokens, heads, micro = packed_positions(prompt_mask, response_mask, max_tokens)
    per_minibatch = [packed_positions(prompt_mask[rows], response_mask[rows], max_tokens) for rows in minibatches]
    update_tokens, update_heads = sum(m[0] for m in per_minibatch), sum(m[1] for m in per_minibatch)
    trunk, head = position_flops(model_config, P + N)

    epochs = sum(len(rows) for rows in minibatches) // B

    def ratio(trunks: int, vocab_heads: int, packed_tokens: int, packed_heads: int, passes: int = 1) -> float:
        unpacked = passes * (trunks * B * (P + N) * trunk + vocab_heads * B * N * head)
        return unpacked / (trunks * packed_tokens * trunk + vocab_heads * packed_heads * head)

    return dict(
        real=real, unpacked=B * (P + N), packed=tokens, micro_batches=micro, head_positions=heads,
        padding_unpacked=1 - real / (B * (P + N)), padding_packed=1 - real / tokens,
        ideal_experience=ratio(3, 2, tokens, heads), ideal_update=ratio(2, 1, update_tokens, update_heads, epochs),
    )  # fmt: skip


def build(name: str, args: Args, max_tokens):
    """The jitted experience pass and update of a PPO trainer (critic on its own trunk)."""
    import jax
    import jax.numpy as jnp

    from jaxrlhf.models import LanguageModel
    from jaxrlhf.training import PPO, PPOConfig
    from jaxrlhf.training.experience import make_experience
    from jaxrlhf.training.hparams import HyperParams
    from jaxrlhf.training.state import ScoreStats
    from jaxrlhf.training.update import make_ppo_update

    model = LanguageModel(model_config(name))
    config = PPOConfig(
        batch_size=args.batch, minibatch_size=args.batch // 2, ppo_epochs=1, max_prompt_len=args.prompt_len,
        max_new_tokens=args.new_tokens, eos_token_id=-1, max_tokens_per_microbatch=max_tokens,
    )  # fmt: skip
    ppo = PPO(config, model, lambda *a: jnp.zeros(a[0].shape[0]))
    hp = HyperParams.from_config(config)
    experience_fn = jax.jit(
        lambda p, v, r, prompts, rollout, scores: make_experience(
            config, ppo.models, p, v, r, prompts, rollout, scores, jnp.float32(0.05), ScoreStats.zeros(), hp
        )[0]
    )
    update = make_ppo_update(config, ppo.models, ppo.policy_optimizer, ppo.value_optimizer)
    update_fn = jax.jit(lambda params, opt, exp, key: update(params, opt, exp, jnp.float32(0.05), hp, key)[:2])
    return model, ppo, experience_fn, update_fn


def time_call(fn, *args):
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def run_model(name: str, args: Args) -> list[str]:
    import jax
    import jax.numpy as jnp

    from jaxrlhf.training.experience import PromptBatch, Rollout

    vocab = model_config(name).vocab_size
    arrays = long_tailed_batch(args.batch, args.prompt_len, args.new_tokens, vocab, args.seed)
    prompts = PromptBatch(jnp.asarray(arrays[0]), jnp.asarray(arrays[1]))
    rollout = Rollout(jnp.asarray(arrays[2]), jnp.asarray(arrays[3]))
    scores = jnp.linspace(-1.0, 1.0, args.batch)
    update_key = jax.random.PRNGKey(1)
    minibatches = update_minibatches(update_key, args.batch, args.batch // 2, epochs=1)  # as `build` configures
    counts = token_counts(arrays[1], arrays[3], args.max_tokens, model_config(name), minibatches)
    programs = {}
    for variant, max_tokens in (("unpacked", None), ("packed", args.max_tokens)):
        model, ppo, experience_fn, update_fn = build(name, args, max_tokens)
        params = model.init_params(jax.random.PRNGKey(0))
        state = ppo.init_state(params)
        value = state.value_params
        compile_start = time.perf_counter()
        experience = jax.block_until_ready(experience_fn(params, value, params, prompts, rollout, scores))
        params_both = {"policy": state.policy_params, "value": value}
        opt = {"policy": state.policy_opt_state, "value": state.value_opt_state}
        jax.block_until_ready(update_fn(params_both, opt, experience, update_key))
        compile_s = time.perf_counter() - compile_start
        programs[variant] = dict(
            experience=(experience_fn, (params, value, params, prompts, rollout, scores)),
            update=(update_fn, (params_both, opt, experience, update_key)),
            compile=compile_s,
        )
    times = {(v, phase): [] for v in programs for phase in ("experience", "update")}
    for _ in range(args.reps):
        for variant, program in programs.items():
            for phase in ("experience", "update"):
                fn, call_args = program[phase]
                times[variant, phase].append(time_call(fn, *call_args))
    median = {key: statistics.median(values) for key, values in times.items()}
    lines = [
        f"\n### {name}: B={args.batch}, P={args.prompt_len}, N={args.new_tokens}, max_tokens={args.max_tokens}",
        f"tokens: real {counts['real']}, unpacked {counts['unpacked']} (padding {counts['padding_unpacked']:.0%}), "
        f"packed {counts['packed']} in {counts['micro_batches']} micro-batches "
        f"(padding {counts['padding_packed']:.0%}); vocabulary head at {args.batch * args.new_tokens} "
        f"response slots unpacked, {counts['head_positions']} positions packed",
        "",
        "| phase | unpacked (s) | packed (s) | speed-up | ideal |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for phase in ("experience", "update"):
        before, after = median["unpacked", phase], median["packed", phase]
        ideal = counts[f"ideal_{phase}"]
        lines.append(f"| {phase} | {before:.3f} | {after:.3f} | {before / after:.2f}x | {ideal:.2f}x |")
    lines.append(
        f"compile (experience + update): unpacked {programs['unpacked']['compile']:.1f} s, "
        f"packed {programs['packed']['compile']:.1f} s"
    )
    return lines


def main(argv=None) -> None:
    args = tyro.cli(Args, args=argv)
    if args.quick:
        args = dataclasses.replace(args, models=("tiny",), batch=8, prompt_len=8, new_tokens=32,
                                   max_tokens=2 * (8 + 32), reps=1)  # fmt: skip
    load = os.getloadavg()
    print(f"# packed vs unpacked experience and update (load average {load[0]:.1f}, {load[1]:.1f})")
    for name in args.models:
        print("\n".join(run_model(name, args)), flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
