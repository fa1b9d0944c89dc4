"""Progressive distillation: a frozen teacher, a student, stages in ONE training run.

    step s of a row (stages k = 0..S-1 with ends e_0 < e_1 < ... < e_{S-1} = steps):
      k(s)   = #{j : s >= e_j}                        the stage this step belongs to
      loss_s = w_k . (CE, L_feat, L_attn, L_logit, L_rules)  (+ the student's balance term)
      params, opt = AdamW(lr(s))(grad loss_s)          ONE optimizer state, ONE schedule:
      lr(s)  = warm-up over the first warmup_steps, cosine to the row's last step

A stage switch changes only the loss weights (`StageConfig`: its share of the steps
and its weights). Earlier, each stage was its own run with its own warm-up, cosine
and fresh AdamW, so a row with more stages also had more warm-up restarts (issue
16's confound); now a 3-stage row and a 1-stage row of the same budget see the same
learning rate at every step, and Adam's moments run on across switches.

The stage table is an input of the step (`frozen["plan"]`, arrays padded to
MAX_STAGES), not part of the compiled program: every row of an ablation, with any
stages, and every seed share one compiled step per (student, teacher) config. Inside
the step, `lax.switch` picks one of three branches by what the stage needs from the
teacher (nothing: CE only; logits and hidden states: features, logits, rules; those
and attention probabilities), so a step computes only what its stage needs.
The teacher runs under `stop_gradient`. When widths differ, the student carries a
projection W (Ds, Dt) (TinyBERT's W_h) for the whole run (so every row has the same
state); only feature stages give it gradients, and it is dropped at the end.

The row is an `Objective` of the one training loop (`train.loop.train`): the teacher,
the rule tree and the stage table are its `frozen` input, passed to every step and
never checkpointed; the student and W are its params. So a row gets the loop's
progress bar, logs, checksummed checkpoints, exact resume (the stage follows from the
restored step) and non-finite guard, in one work directory.
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
from moe_jax.train.loop import RunResult, evaluate, train
from moe_jax.train.objective import Objective, lm_eval, step_config
from moe_jax.train.step import init_state

TERMS = ("ce", "feature", "attention", "logit", "rules")   # the weights, in table order
MAX_STAGES = 4     # the stage table's fixed length (same shapes: one compiled step)


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One stage: its share of the row's steps and its loss weights (0: term off).
  The learning rate and warm-up belong to the row (its TrainConfig), not the stage."""
  name: str
  steps: int
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
    for f in TERMS:
      need(getattr(self, f) >= 0, f, "must be >= 0 (0 switches the term off)")
    need(sum(getattr(self, f) for f in TERMS) > 0, "ce",
         "at least one loss weight (ce, feature, attention, logit, rules) must be > 0")
    need(0 < self.temperature <= 100, "temperature", "must be in (0, 100]")

  @property
  def branch(self) -> int:
    """What the stage needs from the teacher: 0 nothing (CE only, no teacher
    forward), 1 logits and hidden states (features, logits, rules), 2 those and the
    attention probabilities (the explicit-probability attention path)."""
    if not (self.feature or self.attention or self.logit or self.rules):
      return 0
    return 2 if self.attention else 1


# (teacher forward, attention probabilities) of each branch. Three, not one per
# combination of terms: each branch is compiled into the step, and the hidden
# states cost nothing extra to return, so logits-only and feature stages share one.
_BRANCHES = ((False, False), (True, False), (True, True))


def stage_table(stages: list[StageConfig] | tuple[StageConfig, ...]) -> dict[str, np.ndarray]:
  """The stages as arrays of length MAX_STAGES (the step's `frozen["plan"]`):
  ends (S,) int32 cumulative steps, weights (S, 5) in TERMS order, temperature (S,),
  branch (S,) int32. Padding repeats the last stage and is never reached."""
  if not 1 <= len(stages) <= MAX_STAGES:
    raise ValueError(f"a row has 1 to {MAX_STAGES} stages, got {len(stages)}: "
                     f"{[s.name for s in stages]}")
  padded = list(stages) + [stages[-1]] * (MAX_STAGES - len(stages))
  ends = np.cumsum([s.steps for s in stages])
  ends = np.concatenate([ends, np.full(MAX_STAGES - len(stages), 2**31 - 1)])
  return {"ends": ends.astype(np.int32),
          "weights": np.array([[getattr(s, f) for f in TERMS] for s in padded], np.float32),
          "temperature": np.array([s.temperature for s in padded], np.float32),
          "branch": np.array([s.branch for s in padded], np.int32)}


def stage_index(plan: dict[str, jax.Array], step: jax.Array) -> jax.Array:
  """() int32: the stage of 0-based `step` (the number of stage ends <= step)."""
  return jnp.minimum(jnp.sum(step >= plan["ends"]), MAX_STAGES - 1).astype(jnp.int32)


# ---------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------

def distill_loss(params, batch, teacher_out, rules: RuleTree | None, *, weights,
                 temperature, student_cfg: ModelConfig, mapping: tuple[int, ...],
                 tcfg: TrainConfig):
  """The weighted loss of one batch. teacher_out: None (CE only) or the teacher's
  logits (B, T, V) and, where present, hidden (Lt, B, T, Dt) and attention
  (Lt, B, Nt, T, T); a term is computed when its teacher input is there (0 if not).
  weights: {term: weight} (may be traced: the step reads them from the stage table)."""
  has = lambda k: teacher_out is not None and k in teacher_out
  s_logits, aux = Transformer(student_cfg).apply(
      {"params": params["student"]}, batch["inputs"],
      return_hidden=has("hidden"), return_attention=has("attention"))
  s_hidden, s_attention = aux.pop("hidden", None), aux.pop("attention", None)
  ce, acc = lm_losses.cross_entropy(s_logits, batch["targets"])
  zero = jnp.zeros((), jnp.float32)
  terms = dict.fromkeys(TERMS + ("rule_coverage",), zero)
  terms["ce"] = ce
  if teacher_out is not None:
    terms["logit"] = losses.logit_kd(s_logits, teacher_out["logits"], temperature)
  if has("hidden"):
    terms["feature"] = losses.feature_loss(s_hidden, teacher_out["hidden"], mapping,
                                           params.get("proj"))
    if rules is not None:
      rule_probs, covered = apply_rules(rules, batch["inputs"], teacher_out["hidden"][-1])
      mask = covered & (batch["domain"] == rules.domain)[:, None]         # (B, T)
      terms["rules"] = losses.rule_loss(s_logits, rule_probs, mask)
      terms["rule_coverage"] = jnp.mean(mask.astype(jnp.float32))
  if has("attention"):
    terms["attention"] = losses.attention_kl(s_attention, teacher_out["attention"],
                                             mapping)
  balance = lm_losses.balance_loss(aux, tcfg.balance_loss, tcfg.balance_alpha)
  total = sum(weights[k] * terms[k] for k in TERMS) + balance
  return total, dict(terms, accuracy=acc, balance=jnp.asarray(balance, jnp.float32))


def teacher_forward(teacher_variables, inputs, *, attention: bool,
                    teacher_cfg: ModelConfig):
  """The frozen teacher's logits, hidden states and (if `attention`) attention
  probabilities, under stop_gradient."""
  t_logits, t_aux = Transformer(teacher_cfg).apply(
      teacher_variables, inputs, return_hidden=True, return_attention=attention)
  return jax.lax.stop_gradient(
      {"logits": t_logits, **{k: t_aux[k] for k in ("hidden", "attention") if k in t_aux}})


@functools.lru_cache(maxsize=16)
def _distill_functions(student_cfg: ModelConfig, teacher_cfg: ModelConfig,
                       tcfg: TrainConfig):
  """The loss and eval functions of a (student, teacher) pair: the same objects for
  every row, stage table and seed, so they share one compiled step
  (train.step.compile_steps keys its cache on them)."""
  mapping = losses.layer_map(student_cfg.n_layers, teacher_cfg.n_layers)

  def loss(params, extra, batch, frozen, rng, step):
    del rng
    plan = frozen["plan"]
    k = stage_index(plan, step)
    weights = dict(zip(TERMS, plan["weights"][k]))
    temperature = plan["temperature"][k]

    def branch(needs):
      use_teacher, attention = needs
      def run(params):
        teacher_out = teacher_forward(frozen["teacher"], batch["inputs"],
                                      attention=attention, teacher_cfg=teacher_cfg
                                      ) if use_teacher else None
        return distill_loss(params, batch, teacher_out, frozen["rules"], weights=weights,
                            temperature=temperature, student_cfg=student_cfg,
                            mapping=mapping, tcfg=tcfg)
      return run

    total, metrics = jax.lax.switch(plan["branch"][k], [branch(b) for b in _BRANCHES],
                                    params)
    return total, (dict(metrics, stage=k.astype(jnp.float32)), extra)

  return loss, _student_eval(student_cfg)


@functools.lru_cache(maxsize=16)
def _student_eval(student_cfg: ModelConfig):
  """The student's held-out evaluation, one function per student config."""
  def evaluate(params, extra, batch, frozen):
    return lm_eval({"params": params["student"]}, batch, student_cfg)
  return evaluate


def distill_objective(student_params, stages, *, student_cfg: ModelConfig,
                      teacher_cfg: ModelConfig, tcfg: TrainConfig) -> Objective:
  """A row of stages as an `Objective` of the training loop.

    params = {"student": ...[, "proj": W (Ds, Dt)]}       trained, checkpointed
    frozen = {"teacher": variables, "rules": RuleTree | None,
              "plan": stage_table(stages)}               passed to every step, not saved

  W exists whenever the widths differ, from a seeded normal / sqrt(Ds). The stages
  are in the objective's config, so a resume with other stages is refused. Held-out
  evaluation is the student's language-model loss."""
  def init(rng):
    del rng                               # the student starts from given params
    params = {"student": jax.tree.map(jnp.copy, student_params)}   # the step donates
    if student_cfg.d_model != teacher_cfg.d_model:
      params["proj"] = (jax.random.normal(jax.random.PRNGKey(tcfg.seed + 7),
                                          (student_cfg.d_model, teacher_cfg.d_model))
                        / np.sqrt(student_cfg.d_model))            # (Ds, Dt)
    return params, {}

  loss, evaluate = _distill_functions(student_cfg, teacher_cfg, step_config(tcfg))
  return Objective(name="distill/" + "+".join(s.name for s in stages), init=init,
                   loss=loss, evaluate=evaluate, batch_keys=("inputs", "targets", "domain"),
                   config={"stages": [dataclasses.asdict(s) for s in stages],
                           "teacher": dataclasses.asdict(teacher_cfg)})


# ---------------------------------------------------------------------------------
# A row of stages
# ---------------------------------------------------------------------------------

def init_student(student_cfg: ModelConfig, seq_len: int, seed: int = 0):
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return nn.meta.unbox(Transformer(student_cfg).init(jax.random.PRNGKey(seed), tokens)
                       )["params"]


def run_stages(student_params, stages: list[StageConfig], *, student_cfg: ModelConfig,
               teacher_variables, teacher_cfg: ModelConfig, dcfg: data_lib.DataConfig,
               tcfg: TrainConfig, workdir: str | os.PathLike,
               rules: RuleTree | None = None, data_state: dict | None = None,
               corpus=None, progress: bool = False, **train_kw) -> RunResult:
  """Train the student from `student_params` through `stages` as ONE run of the
  training loop in `workdir` (a rerun resumes there): tcfg's lr and warm-up, its
  steps replaced by the stages' total, one AdamW state. The history's `stage` is
  the stage index (a mean over the log window); the student is
  `result.state.params["student"]`."""
  stages = list(stages)
  for stage in stages:
    if stage.rules and rules is None:
      raise ValueError(f"stage {stage.name!r} has rules={stage.rules} but no RuleTree "
                       f"was given (fit one with moe_jax.distill.fit_rules)")
  plan = stage_table(stages)
  tcfg = tcfg.replace(steps=int(plan["ends"][len(stages) - 1]),
                      warmup_steps=min(tcfg.warmup_steps, int(plan["ends"][len(stages) - 1])))
  objective = distill_objective(student_params, stages, student_cfg=student_cfg,
                                teacher_cfg=teacher_cfg, tcfg=tcfg)
  return train(student_cfg, dcfg, tcfg, workdir, objective=objective,
               frozen={"teacher": teacher_variables, "rules": rules, "plan": plan},
               data_state=data_state, corpus=corpus, progress=progress,
               desc="distill " + "+".join(s.name for s in stages), **train_kw)


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
