"""GRPO: PPO without a critic, advantages relative to a group of samples of one prompt.

    batch {"prompts": (B, P)} ─ repeat G ─> (B G, P) ─ rollout (ppo._sample) ─> R (B G[, n_p])
    A_i = Σ_p (R_ip - mean_group R_p) / std_group R_p     (per_principle; else on Σ_p R_p)
    loss = clipped policy loss(A_i on every token of i) + kl_coef · mean k3(π, π_ref)

Shao et al. (2024, DeepSeekMath) put the KL to the reference in the loss with the k3
estimator (unbiased, >= 0) rather than in the reward; `kl_coef` is the same knob as
PPO's (0.2 by default). The rollout is kept in `extra` for `ppo_epochs` steps, as in
ppo.py, so training runs through the one loop with exact resume. With
`per_principle`, a reward of shape (B, n_principles) is normalised per principle
within each group before the sum, so a principle whose reward barely varies (always
passed) does not weigh less than one whose scale is large.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_jax.align import rl_math
from moe_jax.align import rollout as ro_lib
from moe_jax.align.ppo import RLConfig, RewardFn, _sample, rl_objective, rollout_metrics
from moe_jax.config import ModelConfig, TrainConfig
from moe_jax.train.objective import Objective, lm_eval


@functools.lru_cache(maxsize=16)
def _grpo_functions(mcfg: ModelConfig, tcfg: TrainConfig, cfg: RLConfig, reward_fn,
                    scores_2d: bool):
  def rollout(params, extra, frozen, prompts, rng):
    prompts = jnp.repeat(prompts, cfg.group, axis=0)                  # (B G, P)
    ro = _sample(params, extra, frozen, prompts, rng, mcfg, cfg, reward_fn)
    scores = ro["scores"]
    if scores_2d and not cfg.per_principle:
      scores = scores.sum(-1)                                         # (B G,)
    adv = rl_math.group_advantages(scores, cfg.group)                 # (B G,)
    ro.pop("values")
    return dict(ro, adv=adv)

  def loss(params, extra, batch, frozen, rng, step):
    p = batch["prompts"].shape[1]
    ro = jax.lax.cond(step % cfg.ppo_epochs == 0,
                      lambda: rollout(params, extra, frozen, batch["prompts"], rng),
                      lambda: extra["rollout"])
    mask = ro["mask"]
    policy = ro_lib.policy_variables(params, extra, frozen, cfg.lora)
    logp, ent, _ = ro_lib.forward(policy, ro["tokens"], p, mcfg, cfg.temperature)
    adv = jnp.broadcast_to(ro["adv"][:, None], mask.shape)            # (B G, N)
    pl, clip_frac = rl_math.policy_loss(logp, ro["logp"], adv, mask, cfg.clip)
    kl = rl_math.masked_mean(rl_math.kl_estimate(logp, ro["logp_ref"], "k3"), mask)
    ent_mean = rl_math.masked_mean(ent, mask)
    total = pl + extra["kl_coef"] * kl - cfg.ent_coef * ent_mean
    metrics = dict(rollout_metrics(ro, scores_2d), policy_loss=pl, kl_loss=kl,
                   clip_frac=clip_frac, entropy=ent_mean)
    return total, (metrics, {**extra, "rollout": ro})

  def evaluate(params, extra, batch, frozen):
    return lm_eval(ro_lib.policy_variables(params, extra, frozen, cfg.lora), batch, mcfg)

  return loss, evaluate, rollout


def grpo_objective(mcfg: ModelConfig, tcfg: TrainConfig, cfg: RLConfig, init_params,
                   reward_fn: RewardFn, *, batch_size: int, prompt_len: int, frozen,
                   router_bias=None, config: dict | None = None) -> Objective:
  """GRPO of `init_params` against `reward_fn`; `batch_size` prompts per step, each
  sampled `cfg.group` times. `frozen` as for ppo.ppo_objective."""
  return rl_objective("grpo", _grpo_functions, mcfg, tcfg, cfg, init_params, reward_fn,
                      batch_size=batch_size, rows=batch_size * cfg.group,
                      prompt_len=prompt_len, frozen=frozen, router_bias=router_bias,
                      critic=False, config=config)
