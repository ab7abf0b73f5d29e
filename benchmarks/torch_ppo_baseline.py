"""The baseline of `benchmarks/ppo_step.py`: one PPO iteration as TRL's pre-1.0 `PPOTrainer` ran it.

A plain PyTorch loop over `transformers` models, no compilation:

    rollout     policy.generate(do_sample, KV cache)                          (no grad)
    experience  forwards of policy, reference and critic over prompt + response (no grad):
                  logprobs, ref_logprobs (log_softmax(logits / T)), values, entropy    [B, N]
                score = reward(prompt, response)
                r = -beta * (logprobs - ref_logprobs) * mask;  r[last valid] += score
                GAE (reversed Python loop over time, like TRL), A <- whiten(A)
    update      for each epoch, for each minibatch of a random permutation:
                  L = pg_loss(clipped ratio, token-mean) + vf_coef * vf_loss(clipped)
                  backward, clip each model's grad norm, AdamW step (policy and critic)

The critic is a `GPT2Model` trunk with a `Linear(D, 1)` value head on its last hidden state, as
TRL's separate value model. The formulas are those of docs/design.md (what jaxrlhf computes).

GRPO (`TorchGRPO`, `benchmarks/ppo_step.py --algorithm grpo`): no critic. The rollout samples G
responses per prompt (`repeat_interleave`); the experience runs the policy (old log-probs) and the
reference forwards, scores, and `A = (r - mean_g r) / (std_g r + 1e-6)` per group (Bessel's std);
the update's loss per minibatch is the clipped ratio loss plus `beta * k3(ref, policy)`
(`exp(ref - lp) - (ref - lp) - 1`, beta 0.04), each response's token mean averaged over responses
("seq-mean-token-mean"), then the grad-norm clip and AdamW: `preset("grpo")`'s formulas.

LoRA (`lora_policy`): the policy is a `peft` model whose base is frozen; the optimizer and the
grad-norm clip see the adapters only, and the reference is the same model with its adapters
switched off (`with policy.disable_adapter():`), so no second copy of the weights exists. The
critic stays a full trunk + head.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class TorchPPOSettings:
    max_new_tokens: int
    minibatch_size: int
    ppo_epochs: int = 1
    temperature: float = 1.0
    kl_coef: float = 0.05
    gamma: float = 1.0
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1
    learning_rate: float = 1e-5
    max_grad_norm: float = 1.0


class Critic(torch.nn.Module):
    """Value model: transformer trunk + scalar head on the final hidden states."""

    def __init__(self, trunk: torch.nn.Module, head: torch.nn.Linear):
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, input_ids, attention_mask, position_ids):
        hidden = self.trunk(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        return self.head(hidden).squeeze(-1)


def lora_policy(policy, rank: int, alpha: float, target_modules: list[str]):
    """`policy` with LoRA adapters (peft; `fan_in_fan_out` for GPT-2's `Conv1D` weights, stored
    (in, out)): `W x + (alpha / rank) B A x` on each module whose name ends in one of
    `target_modules`, `A` random and `B = 0`, no dropout, biases frozen."""
    import peft

    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        fan_in_fan_out=True,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(policy, config)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def masked_mean(x, mask, dim=None):
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x, mask, eps=1e-8):
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps)


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def response_logits(model, ids, mask, prompt_len, num_new):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    return logits[:, prompt_len - 1 : prompt_len - 1 + num_new]


def logprobs_of(logits, tokens, temperature):
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1), logp


def frozen_reference(policy):
    """The reference model: a frozen deep copy of the policy, or None for a `peft` policy, whose
    reference is itself with the adapters off (`sequence_logprobs`)."""
    if hasattr(policy, "disable_adapter"):
        return None
    return copy.deepcopy(policy).eval().requires_grad_(False)


def clipped_policy_loss(ratio, advantages, clip_eps: float):
    """Per token: max(-A r, -A clip(r, 1 - eps, 1 + eps))."""
    return torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))


@torch.no_grad()
def sample_responses(policy, prompt_ids, prompt_mask, max_new_tokens: int, temperature: float):
    """`max_new_tokens` sampled tokens per prompt (KV cache, no top-k / top-p) and their mask."""
    policy.eval()
    out = policy.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        use_cache=True,
        pad_token_id=0,
    )
    policy.train()
    response = out[:, prompt_ids.shape[1] :]
    # No EOS in these runs (the generation config has none): every response token is valid.
    return response, torch.ones_like(response)


@torch.no_grad()
def sequence_logprobs(policy, ref, prompt_ids, prompt_mask, response, response_mask, temperature: float):
    """Prompt + response as one sequence (ids, mask), and the response tokens' log-probs under the
    policy and the reference (`ref` None: the policy with its LoRA adapters off). Also the
    policy's full log-softmax, for the entropy."""
    P, N = prompt_ids.shape[1], response.shape[1]
    ids = torch.cat([prompt_ids, response], 1)
    mask = torch.cat([prompt_mask, response_mask], 1)
    logprobs, logp = logprobs_of(response_logits(policy, ids, mask, P, N), response, temperature)
    if ref is None:
        with policy.disable_adapter():
            ref_logits = response_logits(policy, ids, mask, P, N)
    else:
        ref_logits = response_logits(ref, ids, mask, P, N)
    ref_logprobs, _ = logprobs_of(ref_logits, response, temperature)
    return ids, mask, logprobs, ref_logprobs, logp


class TorchPPO:
    """Policy, frozen reference, critic and two AdamW optimizers; `step` runs one timed iteration.

    A `peft` policy (`lora_policy`) trains its adapters only and is its own reference with the
    adapters off; any other policy trains every weight against a frozen deep copy."""

    def __init__(self, policy, critic: Critic, reward_fn: Callable, settings: TorchPPOSettings):
        self.policy = policy.train()
        self.ref = frozen_reference(policy)
        self.critic = critic.train()
        self.reward_fn = reward_fn
        self.s = settings
        self.policy_trainable = trainable_parameters(self.policy)
        self.policy_opt = torch.optim.AdamW(
            self.policy_trainable, lr=settings.learning_rate, weight_decay=0.0, eps=1e-8
        )
        self.critic_opt = torch.optim.AdamW(
            self.critic.parameters(), lr=settings.learning_rate, weight_decay=0.0, eps=1e-8
        )

    # ---------------------------------------------------------------- phases

    def rollout(self, prompt_ids, prompt_mask):
        return sample_responses(self.policy, prompt_ids, prompt_mask, self.s.max_new_tokens, self.s.temperature)

    @torch.no_grad()
    def experience(self, prompt_ids, prompt_mask, response, response_mask):
        s = self.s
        P, N = prompt_ids.shape[1], response.shape[1]
        # LoRA: the reference is the base, i.e. the policy with adapters off.
        ids, mask, logprobs, ref_logprobs, logp = sequence_logprobs(
            self.policy, self.ref, prompt_ids, prompt_mask, response, response_mask, s.temperature
        )
        entropy = -(logp.exp() * logp).sum(-1)
        del logp
        values = self.critic(ids, mask, positions(mask))[:, P - 1 : P - 1 + N].float()
        scores = self.reward_fn(prompt_ids, prompt_mask, response, response_mask)

        maskf = response_mask.float()
        kl = logprobs - ref_logprobs  # k1
        rewards = -s.kl_coef * kl * maskf
        last = (maskf.sum(1).long() - 1).clamp(min=0)
        rewards[torch.arange(len(last)), last] += scores
        # GAE as TRL's compute_advantages: a reversed loop over response positions.
        values_m = values * maskf
        lastgaelam = torch.zeros_like(scores)
        advantages_reversed = []
        for t in reversed(range(N)):
            next_values = values_m[:, t + 1] if t < N - 1 else torch.zeros_like(scores)
            delta = rewards[:, t] + s.gamma * next_values - values_m[:, t]
            lastgaelam = delta + s.gamma * s.gae_lambda * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], 1) * maskf
        returns = advantages + values_m
        advantages = masked_whiten(advantages, maskf)
        stats = {"kl": (kl * maskf).sum(1).mean().item(), "entropy": masked_mean(entropy, maskf).item()}
        return dict(
            ids=ids,
            mask=mask,
            response=response,
            response_mask=maskf,
            logprobs=logprobs,
            values=values,
            advantages=advantages,
            returns=returns,
        ), stats

    def update(self, exp, prompt_len):
        s = self.s
        B, N = exp["response"].shape
        for _ in range(s.ppo_epochs):
            perm = torch.randperm(B)
            for start in range(0, B, s.minibatch_size):
                idx = perm[start : start + s.minibatch_size]
                mb = {k: v[idx] for k, v in exp.items()}
                m = mb["response_mask"]
                logits = response_logits(self.policy, mb["ids"], mb["mask"], prompt_len, N)
                logprobs, _ = logprobs_of(logits, mb["response"], s.temperature)
                vpred = self.critic(mb["ids"], mb["mask"], positions(mb["mask"]))[
                    :, prompt_len - 1 : prompt_len - 1 + N
                ]
                ratio = torch.exp(logprobs - mb["logprobs"])
                adv = mb["advantages"]
                pg = clipped_policy_loss(ratio, adv, s.clip_eps)
                pg_loss = masked_mean(pg, m)
                v_clipped = mb["values"] + (vpred - mb["values"]).clamp(-s.value_clip_eps, s.value_clip_eps)
                vf = torch.max((vpred - mb["returns"]) ** 2, (v_clipped - mb["returns"]) ** 2)
                vf_loss = 0.5 * masked_mean(vf, m)
                loss = pg_loss + s.vf_coef * vf_loss
                self.policy_opt.zero_grad(set_to_none=True)
                self.critic_opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.policy_trainable, s.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(self.critic.parameters(), s.max_grad_norm)
                self.policy_opt.step()
                self.critic_opt.step()
        return {"loss": loss.item()}

    def step(self, prompt_ids, prompt_mask):
        """One iteration; returns the seconds of each phase."""
        t0 = time.perf_counter()
        response, response_mask = self.rollout(prompt_ids, prompt_mask)
        t1 = time.perf_counter()
        exp, _ = self.experience(prompt_ids, prompt_mask, response, response_mask)
        t2 = time.perf_counter()
        self.update(exp, prompt_ids.shape[1])
        t3 = time.perf_counter()
        return {"rollout": t1 - t0, "experience": t2 - t1, "update": t3 - t2}


@dataclasses.dataclass
class TorchGRPOSettings:
    max_new_tokens: int
    minibatch_size: int  # responses
    group: int
    temperature: float = 1.0
    kl_coef: float = 0.04
    clip_eps: float = 0.2
    learning_rate: float = 1e-5
    max_grad_norm: float = 1.0
    std_eps: float = 1e-6


class TorchGRPO:
    """GRPO's policy and frozen reference with one AdamW optimizer; `step` runs one timed
    iteration on the prompts, each sampled `settings.group` times (see the module docstring)."""

    def __init__(self, policy, reward_fn: Callable, settings: TorchGRPOSettings):
        self.policy = policy.train()
        self.ref = frozen_reference(policy)
        self.reward_fn = reward_fn
        self.s = settings
        self.policy_trainable = trainable_parameters(self.policy)
        self.policy_opt = torch.optim.AdamW(
            self.policy_trainable, lr=settings.learning_rate, weight_decay=0.0, eps=1e-8
        )

    def rollout(self, prompt_ids, prompt_mask):
        """The prompts, each repeated G times, and a response to each."""
        prompt_ids = prompt_ids.repeat_interleave(self.s.group, 0)
        prompt_mask = prompt_mask.repeat_interleave(self.s.group, 0)
        response, response_mask = sample_responses(
            self.policy, prompt_ids, prompt_mask, self.s.max_new_tokens, self.s.temperature
        )
        return prompt_ids, prompt_mask, response, response_mask

    @torch.no_grad()
    def experience(self, prompt_ids, prompt_mask, response, response_mask):
        s = self.s
        ids, mask, logprobs, ref_logprobs, _ = sequence_logprobs(
            self.policy, self.ref, prompt_ids, prompt_mask, response, response_mask, s.temperature
        )
        scores = self.reward_fn(prompt_ids, prompt_mask, response, response_mask).view(-1, s.group)
        advantages = (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + s.std_eps)
        return dict(
            ids=ids,
            mask=mask,
            response=response,
            response_mask=response_mask.float(),
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            advantages=advantages.reshape(-1, 1),
        )

    def update(self, exp, prompt_len):
        s = self.s
        B, N = exp["response"].shape
        perm = torch.randperm(B)
        for start in range(0, B, s.minibatch_size):
            mb = {k: v[perm[start : start + s.minibatch_size]] for k, v in exp.items()}
            m = mb["response_mask"]
            logits = response_logits(self.policy, mb["ids"], mb["mask"], prompt_len, N)
            logprobs, _ = logprobs_of(logits, mb["response"], s.temperature)
            ratio = torch.exp(logprobs - mb["logprobs"])
            adv = mb["advantages"]
            pg = clipped_policy_loss(ratio, adv, s.clip_eps)
            log_ratio = mb["ref_logprobs"] - logprobs
            k3 = torch.exp(log_ratio) - log_ratio - 1
            per_response = ((pg + s.kl_coef * k3) * m).sum(1) / m.sum(1).clamp(min=1)
            loss = per_response.mean()
            self.policy_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy_trainable, s.max_grad_norm)
            self.policy_opt.step()
        return {"loss": loss.item()}

    def step(self, prompt_ids, prompt_mask):
        """One iteration; returns the seconds of each phase."""
        t0 = time.perf_counter()
        prompt_ids, prompt_mask, response, response_mask = self.rollout(prompt_ids, prompt_mask)
        t1 = time.perf_counter()
        exp = self.experience(prompt_ids, prompt_mask, response, response_mask)
        t2 = time.perf_counter()
        self.update(exp, prompt_ids.shape[1])
        t3 = time.perf_counter()
        return {"rollout": t1 - t0, "experience": t2 - t1, "update": t3 - t2}
