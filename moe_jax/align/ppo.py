"""PPO against a reward model, as one `Objective` of the one training loop.

    step s of loop.train (batch = {"prompts": (B, P)} from a PromptIterator)
      s % ppo_epochs == 0 ?  lax.cond ─ yes: new rollout (params stop-gradient'ed)
         │                              tokens = engine.decode(policy, prompts)  KV cache
         │                              logp_old, values_old = policy(tokens)
         │                              logp_ref = reference(tokens)          (frozen)
         │                              R = reward_fn(frozen, tokens, mask)   (B,) | (B, P)
         │                              r_t = -kl_coef KL_t + [t = end] R;  GAE -> A, G
         │                        no: the rollout kept in `extra`
      loss = clipped policy loss(A) + vf_coef clipped value loss(G) - ent_coef H
      extra' = {rollout, ...}   (checkpointed with the state: resume is exact)

Why the rollout lives in the train step: the loop then owns everything around it,
checkpoints, exact resume (the rollout, the step's RNG and the prompt iterator's
position are all in the checkpoint), progress, TensorBoard, the non-finite guard,
held-out LM evaluation (the alignment tax) at no extra code. Each rollout is used
for `ppo_epochs` consecutive steps, each one full-batch gradient step (the first of
them at ratio 1, as in PPO's first epoch).

The actor is the whole LM (params["policy"]) or LoRA adapters on a frozen base
(params["adapters"], frozen["base"], `RLConfig.lora_rank`); the critic is a linear
head on the trunk's last hidden state (params["value"], sharing the trunk with the
actor). `frozen` holds the reference policy ("reference"; with LoRA the base serves)
and whatever `reward_fn` reads (the reward model's params). `kl_coef` sits in
`extra` as a number, not in the compiled code, so runs at different coefficients
share one executable; its value is still part of the run's identity.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from moe_jax.adapt import lora as lora_lib
from moe_jax.align import rl_math
from moe_jax.align import rollout as ro_lib
from moe_jax.config import ModelConfig, TrainConfig, require
from moe_jax.train.objective import Objective, lm_eval, model_init, step_config

# reward_fn(frozen, tokens (B, P + N), mask (B, P + N)) -> (B,) or (B, n_principles)
RewardFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """PPO and GRPO settings (InstructGPT / the source: per-token KL 0.2)."""
  kl_coef: float = 0.2              # the source's KL constraint coefficient
  kl_estimator: str = "k1"          # PPO's per-token KL penalty (GRPO: k3 in the loss)
  gamma: float = 1.0
  lam: float = 0.95                 # GAE λ
  clip: float = 0.2                 # policy ratio clip ε
  value_clip: float = 0.2
  vf_coef: float = 0.1
  ent_coef: float = 0.0
  ppo_epochs: int = 4               # train steps per rollout
  response_len: int = 32            # sampled tokens per prompt
  temperature: float = 1.0
  top_k: int = 0
  stop_token: int = -1              # a response ends after it (-1: fixed length)
  whiten_advantages: bool = True
  group: int = 4                    # GRPO samples per prompt
  per_principle: bool = False       # GRPO: normalise each principle within the group
  lora_rank: int = 0                # 0: train the whole LM; > 0: LoRA adapters

  def __post_init__(self):
    self.validate()

  def replace(self, **kw) -> "RLConfig":
    return dataclasses.replace(self, **kw)

  def validate(self) -> None:
    need = functools.partial(require, self)
    need(self.kl_coef >= 0, "kl_coef", "must be >= 0")
    need(self.kl_estimator in rl_math.KL_ESTIMATORS, "kl_estimator",
         f"must be one of {rl_math.KL_ESTIMATORS}")
    need(0 < self.gamma <= 1, "gamma", "must be in (0, 1]")
    need(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
    need(0 < self.clip < 1, "clip", "must be in (0, 1)")
    need(self.value_clip > 0, "value_clip", "must be > 0")
    need(self.vf_coef >= 0, "vf_coef", "must be >= 0")
    need(self.ent_coef >= 0, "ent_coef", "must be >= 0")
    need(isinstance(self.ppo_epochs, int) and self.ppo_epochs >= 1, "ppo_epochs",
         "must be an int >= 1")
    need(isinstance(self.response_len, int) and self.response_len >= 2, "response_len",
         "must be an int >= 2")
    need(self.temperature > 0, "temperature", "must be > 0 (RL samples)")
    need(self.top_k >= 0, "top_k", "must be >= 0 (0 is off)")
    need(self.stop_token >= -1, "stop_token", "must be a token id, or -1 (none)")
    need(isinstance(self.group, int) and self.group >= 2, "group", "must be an int >= 2")
    need(isinstance(self.lora_rank, int) and self.lora_rank >= 0, "lora_rank",
         "must be an int >= 0 (0: full fine-tuning)")

  @property
  def lora(self) -> lora_lib.LoraConfig | None:
    return (lora_lib.LoraConfig(rank=self.lora_rank, alpha=2.0 * self.lora_rank)
            if self.lora_rank else None)


def _sample(params, extra, frozen, prompts, rng, mcfg, cfg: RLConfig, reward_fn):
  """One rollout of the current policy (no gradient): the shared part of PPO / GRPO."""
  params = jax.lax.stop_gradient(params)
  p = prompts.shape[1]
  policy = ro_lib.policy_variables(params, extra, frozen, cfg.lora)
  tokens = ro_lib.sample_responses(policy, prompts, rng, mcfg=mcfg, n_new=cfg.response_len,
                                   temperature=cfg.temperature, top_k=cfg.top_k)
  mask = ro_lib.response_mask(tokens[:, p:], cfg.stop_token)          # (B, N)
  logp, _, values = ro_lib.forward(policy, tokens, p, mcfg, cfg.temperature,
                                   params.get("value"))
  logp_ref, _, _ = ro_lib.forward(ro_lib.reference_variables(extra, frozen), tokens, p,
                                  mcfg, cfg.temperature)
  scores = reward_fn(frozen, tokens, ro_lib.full_mask(p, mask)).astype(jnp.float32)
  scores = jax.lax.stop_gradient(scores)                              # (B,) | (B, P)
  return dict(tokens=tokens, mask=mask, logp=logp, logp_ref=logp_ref, values=values,
              scores=scores)


def rollout_metrics(ro: dict, scores_2d: bool) -> dict[str, jax.Array]:
  mask = ro["mask"]
  seq_kl = jnp.sum(rl_math.kl_estimate(ro["logp"], ro["logp_ref"], "k1") * mask, axis=1)
  score = ro["scores"].sum(-1) if scores_2d else ro["scores"]         # (B,)
  out = {"reward": jnp.mean(score), "kl": jnp.mean(seq_kl),
         "response_len": jnp.mean(jnp.sum(mask, axis=1))}
  if scores_2d:
    out.update({f"reward/p{i + 1}": m for i, m in enumerate(jnp.mean(ro["scores"], 0))})
  return out


def _init_fn(mcfg: ModelConfig, seq_len: int, cfg: RLConfig, init_params, router_bias,
             rollout_shapes: dict, critic: bool):
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), init_params)
  bias = router_bias or {}

  def init(rng):
    if cfg.lora is not None:
      params = {"adapters": lora_lib.init_adapters(shapes, cfg.lora, rng)}
    else:
      params = {"policy": model_init(mcfg, seq_len, rng, init_params)["params"]}
    if critic:
      params["value"] = ro_lib.init_value_head(mcfg.d_model)
    rollout = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), rollout_shapes)
    return params, {"router_bias": jax.tree.map(jnp.copy, bias), "rollout": rollout,
                    "kl_coef": jnp.asarray(cfg.kl_coef, jnp.float32)}
  return init


def _rollout_shapes(init_params, router_bias, mcfg, cfg, rows, prompt_len, reward_fn,
                    frozen_example, rollout_fn):
  """Shapes of a rollout (by tracing it once, abstractly)."""
  params = {"policy": init_params, "value": ro_lib.init_value_head(mcfg.d_model)}
  if cfg.lora is not None:
    params = {"adapters": lora_lib.init_adapters(init_params, cfg.lora, jax.random.key(0)),
              "value": params["value"]}
  extra = {"router_bias": router_bias or {}, "kl_coef": jnp.float32(0)}
  prompts = jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32)
  return jax.eval_shape(lambda p, e, f, x: rollout_fn(p, e, f, x, jax.random.PRNGKey(0)),
                        params, extra, frozen_example, prompts)


@functools.lru_cache(maxsize=16)
def _ppo_functions(mcfg: ModelConfig, tcfg: TrainConfig, cfg: RLConfig, reward_fn,
                   scores_2d: bool):
  """loss / evaluate / rollout, one set per (configs, reward_fn): the same function
  objects across runs (seeds, KL coefficients), so the compiled step is reused."""
  def rollout(params, extra, frozen, prompts, rng):
    ro = _sample(params, extra, frozen, prompts, rng, mcfg, cfg, reward_fn)
    mask = ro["mask"]
    score = ro["scores"].sum(-1) if scores_2d else ro["scores"]       # (B,)
    kl = rl_math.kl_estimate(ro["logp"], ro["logp_ref"], cfg.kl_estimator) * mask
    rewards = rl_math.token_rewards(score, kl, mask, extra["kl_coef"])  # (B, N)
    adv, returns = rl_math.gae(rewards, ro["values"], mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
      adv = rl_math.whiten(adv, mask)
    return dict(ro, adv=adv, returns=returns)

  def loss(params, extra, batch, frozen, rng, step):
    p = batch["prompts"].shape[1]
    ro = jax.lax.cond(step % cfg.ppo_epochs == 0,
                      lambda: rollout(params, extra, frozen, batch["prompts"], rng),
                      lambda: extra["rollout"])
    mask = ro["mask"]
    policy = ro_lib.policy_variables(params, extra, frozen, cfg.lora)
    logp, ent, values = ro_lib.forward(policy, ro["tokens"], p, mcfg, cfg.temperature,
                                       params["value"])
    pl, clip_frac = rl_math.policy_loss(logp, ro["logp"], ro["adv"], mask, cfg.clip)
    vl = rl_math.value_loss(values, ro["values"], ro["returns"], mask, cfg.value_clip)
    ent_mean = rl_math.masked_mean(ent, mask)
    total = pl + cfg.vf_coef * vl - cfg.ent_coef * ent_mean
    metrics = dict(rollout_metrics(ro, scores_2d), policy_loss=pl, value_loss=vl,
                   clip_frac=clip_frac, entropy=ent_mean,
                   approx_kl_old=rl_math.masked_mean(
                       rl_math.kl_estimate(logp, ro["logp"], "k3"), mask))
    return total, (metrics, {**extra, "rollout": ro})

  def evaluate(params, extra, batch, frozen):
    return lm_eval(ro_lib.policy_variables(params, extra, frozen, cfg.lora), batch, mcfg)

  return loss, evaluate, rollout


def ppo_objective(mcfg: ModelConfig, tcfg: TrainConfig, cfg: RLConfig, init_params,
                  reward_fn: RewardFn, *, batch_size: int, prompt_len: int, frozen,
                  router_bias=None, config: dict | None = None) -> Objective:
  """PPO of the LM `init_params` (also the reference) against `reward_fn`.

  Pass `frozen` (the same tree) to `loop.train`: {"reference": params} (or
  {"base": params} with LoRA) plus what reward_fn reads; it fixes the shapes here.
  The loop's batches: {"prompts": (batch_size, prompt_len)} (PromptIterator)."""
  return rl_objective("ppo", _ppo_functions, mcfg, tcfg, cfg, init_params, reward_fn,
                      batch_size=batch_size, rows=batch_size, prompt_len=prompt_len,
                      frozen=frozen, router_bias=router_bias, critic=True, config=config)


def rl_objective(name: str, functions, mcfg: ModelConfig, tcfg: TrainConfig, cfg: RLConfig,
                 init_params, reward_fn: RewardFn, *, batch_size: int, rows: int,
                 prompt_len: int, frozen, router_bias, critic: bool,
                 config: dict | None) -> Objective:
  """The Objective of one RL algorithm (PPO, GRPO): `functions(mcfg, tcfg, cfg,
  reward_fn, scores_2d) -> (loss, evaluate, rollout)` over `rows` sampled sequences
  per step. kl_coef lives in `extra`, so the compiled functions do not depend on it."""
  _check_lengths(mcfg, cfg, prompt_len)
  scores_2d = _scores_ndim(reward_fn, frozen, rows, prompt_len, cfg) == 2
  loss, evaluate, rollout = functions(mcfg, step_config(tcfg), cfg.replace(kl_coef=0.0),
                                      reward_fn, scores_2d)
  shapes = _rollout_shapes(init_params, router_bias, mcfg, cfg, batch_size, prompt_len,
                           reward_fn, frozen, rollout)
  init = _init_fn(mcfg, prompt_len + cfg.response_len, cfg, init_params, router_bias,
                  shapes, critic=critic)
  return Objective(name=name, init=init, loss=loss, evaluate=evaluate,
                   batch_keys=("prompts",),
                   config={"rl": dataclasses.asdict(cfg), "algorithm": name,
                           "batch_size": batch_size, "prompt_len": prompt_len,
                           **(config or {})})


def _check_lengths(mcfg: ModelConfig, cfg: RLConfig, prompt_len: int) -> None:
  if prompt_len + cfg.response_len > mcfg.max_seq_len:
    raise ValueError(f"prompt_len={prompt_len} + RLConfig.response_len={cfg.response_len} "
                     f"exceeds ModelConfig.max_seq_len={mcfg.max_seq_len}")


def _scores_ndim(reward_fn, frozen, rows: int, prompt_len: int, cfg: RLConfig) -> int:
  """1 for (B,) rewards, 2 for (B, n_principles) (checked abstractly)."""
  t = prompt_len + cfg.response_len
  out = jax.eval_shape(reward_fn, frozen, jax.ShapeDtypeStruct((rows, t), jnp.int32),
                       jax.ShapeDtypeStruct((rows, t), jnp.float32))
  if out.ndim not in (1, 2) or out.shape[0] != rows:
    raise ValueError(f"reward_fn returned shape {out.shape} for {rows} sequences; "
                     f"expected ({rows},) or ({rows}, n_principles)")
  return out.ndim
