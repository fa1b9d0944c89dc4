"""Progressive distillation: a frozen teacher, a student, stages run in sequence.

    stage k:  params_k = train(params_{k-1}, loss_k, steps_k, lr_k)
    loss_k  = ce * CE(z_s, y) + feature * L_feat + attention * L_attn
              + logit * L_logit + rules * L_rules  (+ the student's balance term)

A stage is a `StageConfig`: its own step budget, learning rate (warm-up then cosine,
AdamW from `train.step.make_optimizer`) and loss weights. The teacher runs inside the
jitted step under `stop_gradient`; its hidden states / attention probabilities are
computed only when the stage's losses need them. When widths differ, the feature
stage learns a projection W (Ds, Dt) (TinyBERT's W_h) next to the student; it is
dropped when the stage ends. Each stage starts from the previous stage's student
parameters with a fresh optimizer.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_jax import data as data_lib
from moe_jax import losses as lm_losses
from moe_jax import sharding
from moe_jax.config import ModelConfig, TrainConfig, check_types, require
from moe_jax.distill import losses
from moe_jax.distill.rules import RuleTree, apply_rules
from moe_jax.models.transformer import Transformer
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.loop import evaluate
from moe_jax.train.step import TrainState, eval_step, init_state, make_optimizer


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One stage: budget, learning rate and loss weights (0 switches a term off)."""
  name: str
  steps: int
  lr: float
  warmup_steps: int = 0
  ce: float = 1.0            # task cross-entropy on the data's next token
  feature: float = 0.0       # hidden-state L2 at mapped layers
  attention: float = 0.0     # attention-distribution KL at mapped layers
  logit: float = 0.0         # tau^2 KL of the softened output distributions
  rules: float = 0.0         # KL to the decision-tree rule on covered tokens
  temperature: float = 2.0

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    check_types(self)
    need = functools.partial(require, self)
    need(bool(self.name), "name", "must be a non-empty string")
    need(1 <= self.steps < 2**31, "steps", "must be >= 1")
    need(self.lr > 0, "lr", "must be > 0")
    need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    for f in ("ce", "feature", "attention", "logit", "rules"):
      need(getattr(self, f) >= 0, f, "must be >= 0 (0 switches the term off)")
    need(self.ce + self.feature + self.attention + self.logit + self.rules > 0, "ce",
         "at least one loss weight (ce, feature, attention, logit, rules) must be > 0")
    need(0 < self.temperature <= 100, "temperature", "must be in (0, 100]")

  def train_config(self, base: TrainConfig) -> TrainConfig:
    return base.replace(steps=self.steps, lr=self.lr,
                        warmup_steps=min(self.warmup_steps, self.steps))


@dataclasses.dataclass
class StageResult:
  name: str
  start_params: Any          # the student parameters the stage started from
  params: Any                # ... and ended with
  history: list[dict[str, float]]


# ---------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------

def distill_loss(params, batch, teacher_out, rules: RuleTree | None, *,
                 stage: StageConfig, student_cfg: ModelConfig, mapping: tuple[int, ...],
                 tcfg: TrainConfig):
  """The weighted stage loss of one batch. teacher_out: teacher logits (B, T, V) and,
  as needed, hidden (Lt, B, T, Dt) and attention (Lt, B, Nt, T, T)."""
  s_logits, aux = Transformer(student_cfg).apply(
      {"params": params["student"]}, batch["inputs"],
      return_hidden=stage.feature > 0, return_attention=stage.attention > 0)
  s_hidden, s_attention = aux.pop("hidden", None), aux.pop("attention", None)
  ce, acc = lm_losses.cross_entropy(s_logits, batch["targets"])
  terms = {"ce": ce}
  if stage.feature:
    terms["feature"] = losses.feature_loss(s_hidden, teacher_out["hidden"], mapping,
                                           params.get("proj"))
  if stage.attention:
    terms["attention"] = losses.attention_kl(s_attention, teacher_out["attention"],
                                             mapping)
  if stage.logit:
    terms["logit"] = losses.logit_kd(s_logits, teacher_out["logits"], stage.temperature)
  if stage.rules:
    rule_probs, covered = apply_rules(rules, batch["inputs"], teacher_out["hidden"][-1])
    mask = covered & (batch["domain"] == rules.domain)[:, None]           # (B, T)
    terms["rules"] = losses.rule_loss(s_logits, rule_probs, mask)
    terms["rule_coverage"] = jnp.mean(mask.astype(jnp.float32))
  weights = {"ce": stage.ce, "feature": stage.feature, "attention": stage.attention,
             "logit": stage.logit, "rules": stage.rules}
  balance = lm_losses.balance_loss(aux, tcfg.balance_loss, tcfg.balance_alpha)
  total = sum(weights[k] * v for k, v in terms.items() if k in weights) + balance
  return total, dict(terms, accuracy=acc, balance=balance)


def distill_step(state: TrainState, batch, teacher_variables, rules, *,
                 stage: StageConfig, student_cfg: ModelConfig, teacher_cfg: ModelConfig,
                 mapping: tuple[int, ...], tcfg: TrainConfig):
  """One AdamW step of the student; the teacher forward is frozen."""
  need_hidden = stage.feature > 0 or stage.rules > 0
  t_logits, t_aux = Transformer(teacher_cfg).apply(
      teacher_variables, batch["inputs"], return_hidden=need_hidden,
      return_attention=stage.attention > 0)
  teacher_out = jax.lax.stop_gradient(
      {"logits": t_logits, **{k: t_aux[k] for k in ("hidden", "attention") if k in t_aux}})
  (loss, metrics), grads = jax.value_and_grad(distill_loss, has_aux=True)(
      state.params, batch, teacher_out, rules, stage=stage, student_cfg=student_cfg,
      mapping=mapping, tcfg=tcfg)
  updates, opt_state = make_optimizer(tcfg, state.params).update(
      grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


@functools.lru_cache(maxsize=64)
def _jitted_step(stage, student_cfg, teacher_cfg, mapping, tcfg):
  """One compiled step per distinct (stage, configs): rows of an ablation that
  repeat a stage reuse its executable."""
  return jax.jit(functools.partial(distill_step, stage=stage, student_cfg=student_cfg,
                                   teacher_cfg=teacher_cfg, mapping=mapping, tcfg=tcfg),
                 donate_argnums=0)


# ---------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------

def init_student(student_cfg: ModelConfig, seq_len: int, seed: int = 0):
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return nn.meta.unbox(Transformer(student_cfg).init(jax.random.PRNGKey(seed), tokens)
                       )["params"]


def _device_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  return {k: jnp.asarray(batch[k]) for k in ("inputs", "targets", "domain")}


def run_stage(student_params, stage: StageConfig, *, student_cfg: ModelConfig,
              teacher_variables, teacher_cfg: ModelConfig,
              data_iter: Iterator[dict[str, np.ndarray]], base_tcfg: TrainConfig,
              rules: RuleTree | None = None, log_every: int = 10) -> StageResult:
  """Train the student for `stage.steps` steps from `student_params`."""
  if stage.rules and rules is None:
    raise ValueError(f"stage {stage.name!r} has rules={stage.rules} but no RuleTree "
                     f"was given (fit one with moe_jax.distill.fit_rules)")
  tcfg = stage.train_config(base_tcfg)
  mapping = losses.layer_map(student_cfg.n_layers, teacher_cfg.n_layers)
  params = {"student": jax.tree.map(jnp.copy, student_params)}   # the step donates
  if stage.feature and student_cfg.d_model != teacher_cfg.d_model:
    params["proj"] = (jax.random.normal(jax.random.PRNGKey(tcfg.seed + 7),
                                        (student_cfg.d_model, teacher_cfg.d_model))
                      / np.sqrt(student_cfg.d_model))            # (Ds, Dt)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=make_optimizer(tcfg, params).init(params),
                     router_bias={}, rng=jax.random.PRNGKey(tcfg.seed))
  step_fn = _jitted_step(stage, student_cfg, teacher_cfg, mapping, tcfg)
  window, history = [], []
  for step in range(1, stage.steps + 1):
    state, metrics = step_fn(state, _device_batch(next(data_iter)), teacher_variables,
                             rules)
    window.append(metrics)
    if step % log_every == 0 or step == stage.steps:
      window = jax.device_get(window)
      row = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
      history.append(dict(row, step=step, stage=stage.name))
      if not np.isfinite(row["loss"]):
        raise FloatingPointError(f"stage {stage.name!r}: loss {row['loss']} at step {step}")
      window = []
  return StageResult(name=stage.name, start_params=student_params,
                     params=state.params["student"], history=history)


def run_stages(student_params, stages: list[StageConfig], **kwargs) -> list[StageResult]:
  """Stages in sequence, each from the previous one's student (kwargs: run_stage's)."""
  results = []
  for stage in stages:
    results.append(run_stage(student_params, stage, **kwargs))
    student_params = results[-1].params
  return results


# ---------------------------------------------------------------------------------
# Teacher checkpoint and evaluation
# ---------------------------------------------------------------------------------

def load_teacher(checkpoint_dir: str | os.PathLike, mcfg: ModelConfig, tcfg: TrainConfig,
                 seq_len: int, step: int | None = None) -> dict[str, Any]:
  """The teacher's variables ({"params"[, "router_bias"]}) from a checkpoint written
  by `moe_jax.train.train` (its `<workdir>/checkpoints`)."""
  ckpt = Checkpointer(checkpoint_dir, save_every=1, keep=1)
  try:
    state, _, _ = ckpt.restore(init_state(mcfg, tcfg, seq_len), step)
  finally:
    ckpt.close()
  variables = {"params": state.params}
  if state.router_bias:
    variables["router_bias"] = state.router_bias
  return variables


@functools.lru_cache(maxsize=16)
def _jitted_eval(mcfg: ModelConfig):
  return jax.jit(functools.partial(eval_step, mcfg=mcfg))


def evaluate_model(variables, mcfg: ModelConfig, dcfg: data_lib.DataConfig, corpus,
                   max_batches: int) -> dict[str, dict[str, float]]:
  """Held-out loss, perplexity, next-token accuracy per domain (train.loop.evaluate)."""
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                     opt_state=(), router_bias=variables.get("router_bias", {}),
                     rng=jax.random.PRNGKey(0))
  results, _ = evaluate(_jitted_eval(mcfg), state, dcfg, corpus, sharding.single_device_mesh(),
                        max_batches)
  return results
