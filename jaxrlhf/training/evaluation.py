"""Evaluation helpers shared by the experiments: how far a policy has moved from its reference.

`sequence_kl` is the KL between the policy's and the reference's distributions over responses,
measured on responses sampled from the policy. Per token it takes the exact KL between the two
next-token distributions (a sum over the vocabulary) rather than a sampled estimator such as
``log pi(y_t) - log ref(y_t)``: same expectation, much lower variance for a small evaluation batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.core.sequences import concat_prompt_response


def sequence_kl(model, params, ref_params, prompt_ids, prompt_mask, response_ids, response_mask) -> jax.Array:
    """Per-sequence KL(policy || reference) ``[B]``:

        KL_b = sum_t mask_bt * sum_v pi(v | s_bt) * (log pi(v | s_bt) - log ref(v | s_bt))

    where ``s_bt`` is prompt ``b`` followed by the first ``t`` response tokens. On responses sampled
    from the policy, the batch mean is an unbiased estimate of the KL between the two sequence
    distributions. ``prompt_* [B, P]`` (left-padded), ``response_* [B, T]``; ``model.apply(params,
    ids, mask) -> logits [B, P + T, V]``.
    """
    P = prompt_ids.shape[1]
    T = response_ids.shape[1]
    ids_BxL, mask_BxL = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)

    def response_logp(p):
        # The logits at position P - 1 + t predict response token t.
        logits_BxTxV = model.apply(p, ids_BxL, mask_BxL)[:, P - 1 : P - 1 + T]
        return jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)

    logp_BxTxV, ref_logp_BxTxV = response_logp(params), response_logp(ref_params)
    kl_BxT = jnp.sum(jnp.exp(logp_BxTxV) * (logp_BxTxV - ref_logp_BxTxV), axis=-1)
    return jnp.sum(kl_BxT * response_mask, axis=1)
