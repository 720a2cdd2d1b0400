"""Metrics over Stable-Baselines3 actor-critic policies, in the dtype of the policy's weights.

SB3's own entry points do not fit attribution: `policy(obs)` returns *sampled* actions (not
logits), and `preprocess_obs` casts observations to float32, which fails against the float64
copy of the policy `chisel.attribute` evaluates. These helpers run the same modules
(`pi_features_extractor → mlp_extractor.forward_actor → action_net`, the path of
`ActorCriticPolicy.evaluate_actions`) with the observations cast to the weights' dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn

from chisel.integrations._common import IntegrationError


def _weights(policy: nn.Module) -> Tensor:
    return next(policy.parameters())


def _tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def _preprocess_one(x: Any, space: spaces.Space, policy: nn.Module) -> Tensor:
    """SB3's `preprocess_obs` for one space, in the dtype of the weights instead of float32."""
    from stable_baselines3.common.preprocessing import is_image_space, preprocess_obs

    w = _weights(policy)
    x = torch.as_tensor(x, device=w.device)
    if isinstance(space, spaces.Box):
        x = x.to(w.dtype)  # SB3: obs.float(); the same numbers in float32
        if is_image_space(space) and policy.normalize_images:
            x = x / 255.0
        return x
    # one-hot / binary encodings are exact in any float dtype
    return preprocess_obs(x, space, normalize_images=policy.normalize_images).to(w.dtype)


def preprocess(policy: nn.Module, obs: Any) -> Tensor | dict[str, Tensor]:
    """Observations as the policy's feature extractor takes them, in its weights' dtype."""
    space = policy.observation_space
    if isinstance(space, spaces.Dict):
        return {key: _preprocess_one(obs[key], sub, policy) for key, sub in space.spaces.items()}
    return _preprocess_one(obs, space, policy)


def _check_policy(policy: Any) -> None:
    needed = ("pi_features_extractor", "mlp_extractor", "action_net", "observation_space")
    missing = [name for name in needed if not hasattr(policy, name)]
    if missing or not isinstance(policy, nn.Module):
        raise IntegrationError(
            f"expected a Stable-Baselines3 ActorCriticPolicy (model.policy of PPO or A2C), got a "
            f"{type(policy).__name__} without {missing or 'nn.Module'}. Pass `model.policy`, not "
            "the algorithm; recurrent or custom policies need their own head, e.g. "
            "chisel.metrics.logprob(obs, actions, logits=lambda policy, obs: ...)."
        )


def latent_pi(policy: nn.Module, obs: Any) -> Tensor:
    """The actor's latent [N, d] for observations `obs` [N, ...] (the input of `action_net`)."""
    _check_policy(policy)
    features = policy.pi_features_extractor(preprocess(policy, obs))
    return policy.mlp_extractor.forward_actor(features)


def action_logits(policy: nn.Module, obs: Any) -> Tensor:
    """The action head's output [N, A]: logits for discrete action spaces, the mean for Box.

    A `logits=` head for the metrics of `chisel.metrics`:

        >>> chisel.metrics.action_logit(obs, 1, logits=sb3.action_logits)  # doctest: +SKIP
    """
    return policy.action_net(latent_pi(policy, obs))


def policy_logprob(policy: nn.Module, obs: Any, actions: Any) -> Tensor:
    """log π(a_i | s_i) [N] of `actions` [N, ...] in states `obs` [N, ...], in the weights' dtype.

    Discrete actions normalise the logits as torch's `Categorical` does (vmap-friendly); other action spaces use
    the policy's own distribution (`_get_action_dist_from_latent(...).log_prob`)."""
    latent = latent_pi(policy, obs)
    w = _weights(policy)
    actions = _tensor(actions)
    if isinstance(policy.action_space, spaces.Discrete):
        logits = policy.action_net(latent)
        # torch's Categorical normalises this way (not log_softmax): the same numbers as SB3's
        lp = logits - logits.logsumexp(dim=-1, keepdim=True)
        return lp.gather(-1, actions.to(lp.device).long().reshape(-1, 1))[:, 0]
    dist = policy._get_action_dist_from_latent(latent)
    if isinstance(policy.action_space, spaces.Box):
        actions = actions.to(w.dtype)
    return dist.log_prob(actions.to(w.device))


class _Named:
    """A metric with a readable repr (shown in ledgers and reports)."""

    def __init__(self, fn: Any, description: str) -> None:
        self._fn, self.description = fn, description

    def __call__(self, policy: nn.Module) -> Tensor:
        return self._fn(policy)

    def __repr__(self) -> str:
        return self.description


def logprob(obs: Any, actions: Any) -> _Named:
    """Metric: the mean log-probability of `actions` [N] in states `obs` [N, ...] under the
    policy, for `chisel.attribute(run, model.policy, features, sb3.logprob(obs, actions))`."""
    obs_t = obs if isinstance(obs, dict) else _tensor(obs)
    actions_t = _tensor(actions)
    return _Named(
        lambda policy: policy_logprob(policy, obs_t, actions_t).mean(),
        f"sb3 logprob(actions, n={len(actions_t)})",
    )


def value(obs: Any) -> _Named:
    """Metric: the mean value estimate of the critic over states `obs` [N, ...]."""
    obs_t = obs if isinstance(obs, dict) else _tensor(obs)

    def metric(policy: nn.Module) -> Tensor:
        _check_policy(policy)
        features = policy.vf_features_extractor(preprocess(policy, obs_t))
        return policy.value_net(policy.mlp_extractor.forward_critic(features)).mean()

    n = len(next(iter(obs_t.values()))) if isinstance(obs_t, dict) else len(obs_t)
    return _Named(metric, f"sb3 value (n={n})")
