"""The built-in KL estimators, registered as plug-ins (`jaxrlhf.training.plugins`): ``k1``, ``k2``,
``k3`` and ``abs`` of `jaxrlhf.core.kl.kl_estimate`, with ``d = ref_logprobs - logprobs``:
``k1 = -d``, ``k2 = d^2 / 2``, ``k3 = e^d - d - 1``, ``abs = |d|``. The configured one gives both
the per-token reward penalty (``kl_placement="reward"``) and the KL loss term (``"loss"``)."""

from __future__ import annotations

from jaxrlhf.core.kl import KL_KINDS, kl_estimate
from jaxrlhf.training.plugins import KLInputs, kl_estimator


def _builtin(kind: str):
    def estimate(x: KLInputs):
        return kl_estimate(x.logprobs, x.ref_logprobs, kind)

    estimate.__name__ = estimate.__qualname__ = f"kl_{kind}"
    estimate.__doc__ = f"``{kind}`` of `jaxrlhf.core.kl.kl_estimate`."
    return kl_estimator(kind)(estimate)


BUILTIN = {kind: _builtin(kind) for kind in KL_KINDS}
