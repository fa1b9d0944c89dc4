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

Every stage is an `Objective` of the one training loop (`train.loop.train`): the
teacher (and the rule tree) is its `frozen` input, passed to every step and never
checkpointed; the student and W are its params. So a stage gets the loop's progress
bar, logs, checksummed checkpoints, exact resume and non-finite guard, in its own
work directory; `run_stages` chains the data stream across stages (`data_state`).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import data as data_lib
from moe_jax import losses as lm_losses
from moe_jax import sharding
from moe_jax.config import ModelConfig, TrainConfig, check_types, require
from moe_jax.distill import losses
from moe_jax.distill.rules import RuleTree, apply_rules
from moe_jax.models.transformer import Transformer
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.loop import evaluate, train
from moe_jax.train.objective import Objective, lm_eval, step_config
from moe_jax.train.step import init_state


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
  data_state: dict | None = None   # the data iterator where the stage ended
  run: Any = None                  # the loop's RunResult (configs, eval, ...)


# ---------------------------------------------------------------------------------
# The objective
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


def teacher_forward(teacher_variables, inputs, *, stage: StageConfig,
                    teacher_cfg: ModelConfig):
  """What the stage's losses need from the frozen teacher, under stop_gradient."""
  need_hidden = stage.feature > 0 or stage.rules > 0
  t_logits, t_aux = Transformer(teacher_cfg).apply(
      teacher_variables, inputs, return_hidden=need_hidden,
      return_attention=stage.attention > 0)
  return jax.lax.stop_gradient(
      {"logits": t_logits, **{k: t_aux[k] for k in ("hidden", "attention") if k in t_aux}})


@functools.lru_cache(maxsize=64)
def _distill_functions(stage: StageConfig, student_cfg: ModelConfig, teacher_cfg: ModelConfig,
                       tcfg: TrainConfig):
  """A stage's loss and eval functions, the same objects for the same stage and
  configs, so rows of an ablation that repeat a stage (and a resume) reuse its
  compiled step (train.step.compile_steps keys its cache on them)."""
  mapping = losses.layer_map(student_cfg.n_layers, teacher_cfg.n_layers)

  def loss(params, extra, batch, frozen, rng, step):
    del rng, step
    teacher_out = teacher_forward(frozen["teacher"], batch["inputs"], stage=stage,
                                  teacher_cfg=teacher_cfg)
    total, metrics = distill_loss(params, batch, teacher_out, frozen["rules"], stage=stage,
                                  student_cfg=student_cfg, mapping=mapping, tcfg=tcfg)
    return total, (metrics, extra)

  return loss, _student_eval(student_cfg)


@functools.lru_cache(maxsize=16)
def _student_eval(student_cfg: ModelConfig):
  """The student's held-out evaluation, one function per student config (so every
  stage of a student shares one compiled eval)."""
  def evaluate(params, extra, batch, frozen):
    return lm_eval({"params": params["student"]}, batch, student_cfg)
  return evaluate


def distill_objective(student_params, stage: StageConfig, *, student_cfg: ModelConfig,
                      teacher_cfg: ModelConfig, tcfg: TrainConfig) -> Objective:
  """One stage as an `Objective` of the training loop.

    params = {"student": ..., ["proj": W (Ds, Dt)]}     trained, checkpointed
    frozen = {"teacher": variables, "rules": RuleTree}  passed to every step, not saved

  The projection exists when the feature stage bridges different widths; it starts
  from a seeded normal / sqrt(Ds) and is dropped when the stage ends. Held-out
  evaluation is the student's language-model loss."""
  def init(rng):
    del rng                               # the student starts from given params
    params = {"student": jax.tree.map(jnp.copy, student_params)}   # the step donates
    if stage.feature and student_cfg.d_model != teacher_cfg.d_model:
      params["proj"] = (jax.random.normal(jax.random.PRNGKey(tcfg.seed + 7),
                                          (student_cfg.d_model, teacher_cfg.d_model))
                        / np.sqrt(student_cfg.d_model))            # (Ds, Dt)
    return params, {}

  loss, evaluate = _distill_functions(stage, student_cfg, teacher_cfg, step_config(tcfg))
  return Objective(name=f"distill/{stage.name}", init=init, loss=loss, evaluate=evaluate,
                   batch_keys=("inputs", "targets", "domain"),
                   config={"stage": dataclasses.asdict(stage),
                           "teacher": dataclasses.asdict(teacher_cfg)})


# ---------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------

def init_student(student_cfg: ModelConfig, seq_len: int, seed: int = 0):
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return nn.meta.unbox(Transformer(student_cfg).init(jax.random.PRNGKey(seed), tokens)
                       )["params"]


def run_stage(student_params, stage: StageConfig, *, student_cfg: ModelConfig,
              teacher_variables, teacher_cfg: ModelConfig, dcfg: data_lib.DataConfig,
              base_tcfg: TrainConfig, workdir: str | os.PathLike,
              rules: RuleTree | None = None, data_state: dict | None = None,
              corpus=None, progress: bool = False, **train_kw) -> StageResult:
  """Train the student for `stage.steps` steps from `student_params` through the one
  training loop, in `workdir` (checkpoints, logs; a rerun resumes there).
  `data_state` starts the stream where an earlier stage left it."""
  if stage.rules and rules is None:
    raise ValueError(f"stage {stage.name!r} has rules={stage.rules} but no RuleTree "
                     f"was given (fit one with moe_jax.distill.fit_rules)")
  tcfg = stage.train_config(base_tcfg)
  objective = distill_objective(student_params, stage, student_cfg=student_cfg,
                                teacher_cfg=teacher_cfg, tcfg=tcfg)
  result = train(student_cfg, dcfg, tcfg, workdir, objective=objective,
                 frozen={"teacher": teacher_variables, "rules": rules},
                 data_state=data_state, corpus=corpus, progress=progress,
                 desc=f"distill {stage.name}", **train_kw)
  history = [dict(h, stage=stage.name) for h in result.history]
  return StageResult(name=stage.name, start_params=student_params,
                     params=result.state.params["student"], history=history,
                     data_state=result.data_state, run=result)


def run_stages(student_params, stages: list[StageConfig], *, workdir: str | os.PathLike,
               data_state: dict | None = None, **kwargs) -> list[StageResult]:
  """Stages in sequence, each from the previous one's student and where its data
  stream ended, each in `workdir/<k>_<name>` (kwargs: run_stage's)."""
  results = []
  for k, stage in enumerate(stages):
    results.append(run_stage(student_params, stage, data_state=data_state,
                             workdir=os.path.join(workdir, f"{k}_{stage.name}"), **kwargs))
    student_params, data_state = results[-1].params, results[-1].data_state
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
  return jax.jit(functools.partial(lm_eval, mcfg=mcfg))


def evaluate_model(variables, mcfg: ModelConfig, dcfg: data_lib.DataConfig, corpus,
                   max_batches: int) -> dict[str, dict[str, float]]:
  """Held-out loss, perplexity, next-token accuracy per domain (train.loop.evaluate)."""
  results, _ = evaluate(_jitted_eval(mcfg), variables, dcfg, corpus,
                        sharding.single_device_mesh(), max_batches)
  return results
