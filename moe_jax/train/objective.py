"""What the training loop trains: an `Objective`, and the language-model one.

    params  (trained: the optimizer sees their gradients)          checkpointed
    extra   (carried, not trained: router bias, QAT groups, ...)   checkpointed
    frozen  (read-only input: a teacher, LoRA's base weights, ...) NOT checkpointed
    rng     (per-step key, for dropout / sampling objectives)      checkpointed (in TrainState)

    loss, (metrics, extra') = objective.loss(params, extra, batch, frozen, rng, step)

The loop (loop.py) owns everything around the loss: the optimizer update, the
non-finite guard, checkpoints, resume, logs, evaluation. An objective owns only the
math of one step, so a new kind of training is one `Objective` (see loop.py's
docstring for LoRA, PPO/GRPO and reward models). The language-model objective below
is what `train()` uses when none is given; QAT (quant/qat.py) wraps it, distillation
(distill/stages.py) writes its own.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import losses
from moe_jax.config import ModelConfig, TrainConfig
from moe_jax.kg.fusion import example_inputs, kg_inputs
from moe_jax.models.router import update_router_bias
from moe_jax.models.transformer import Transformer, moe_layer_sets

# loss(params, extra, batch, frozen, rng, step) -> (loss, (metrics, extra))
LossFn = Callable[..., tuple[jax.Array, tuple[dict[str, jax.Array], Any]]]
# evaluate(params, extra, batch, frozen) -> {"nll_sum", "correct", "tokens"[, "load"]}
EvalFn = Callable[[Any, Any, dict[str, jax.Array], Any], dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Objective:
  """One kind of training, as the loop sees it.

  Attributes:
    name: for messages ("lm", "qat", "distill/features", ...).
    init: rng -> (params, extra). `params` may carry flax logical-axis boxes
      (`nn.Partitioned`), which the loop uses to shard the state on a mesh (unboxed
      leaves are replicated); the loop unboxes them. `extra` is any pytree of arrays.
    loss: (params, extra, batch, frozen, rng, step) -> (loss, (metrics, extra')).
      Differentiated w.r.t. `params` only. `metrics` are scalars averaged over each
      logging window, except (L, E) "load" (averaged, balance statistics logged) and
      names ending in "_count" (summed). `step` is the 0-based index of this step.
    evaluate: (params, extra, batch, frozen) -> {"nll_sum", "correct", "tokens"
      [, "load"]} of one held-out batch, or None (no held-out evaluation).
    config: JSON-able identity stored in every checkpoint next to the configs; a
      resume whose objective config differs is refused (e.g. the stage's weights).
    batch_keys: the batch entries the step needs (moved to device, split by rows).
    schedule: TrainConfig -> optax schedule (default: warm-up + cosine of the
      config). A multi-stage run can pass one schedule shifted per stage.
  Parts of `params` are frozen with `TrainConfig.freeze` (regexes of paths); weights
  that are never trained belong in `frozen` instead.
  """
  name: str
  init: Callable[[jax.Array], tuple[Any, Any]]
  loss: LossFn
  evaluate: EvalFn | None = None
  config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  batch_keys: tuple[str, ...] = ("inputs", "targets")
  schedule: Callable[[TrainConfig], Any] | None = None


# ---------------------------------------------------------------------------------
# The language-model objective: cross-entropy + balance + z-loss, V3 bias update
# ---------------------------------------------------------------------------------

def loss_fn(params, router_bias, batch, mcfg: ModelConfig, tcfg: TrainConfig):
  """loss = cross_entropy + balance_loss(aux) + z_loss(aux) + entropy_loss(aux).

  Optional batch entries: "mask" (B, T) drops padding targets from the mean; the kg
  arrays (moe_jax.kg.fusion.KG_KEYS) feed knowledge-graph fusion when it is on."""
  variables = {"params": params}
  if router_bias:
    variables["router_bias"] = router_bias
  logits, aux = Transformer(mcfg).apply(variables, batch["inputs"],
                                        kg=kg_inputs(batch, mcfg))      # (B, T, V)
  ce, acc = losses.cross_entropy(logits, batch["targets"], batch.get("mask"))
  balance = losses.balance_loss(aux, tcfg.balance_loss, tcfg.balance_alpha)
  z = losses.router_z_loss(aux["router_z"], tcfg.z_loss_alpha) if aux else 0.0
  ent = losses.router_entropy_loss(aux["router_entropy"], tcfg.entropy_loss_alpha) \
      if aux else 0.0
  return ce + balance + z + ent, dict(ce=ce, accuracy=acc, balance=balance, z_loss=z,
                                      entropy_loss=ent, aux=aux)


def bias_update(router_bias, load: jax.Array, mcfg: ModelConfig, gamma: float):
  """Sum each MoE layer's load into the router it used, then take one V3 step."""
  sets = moe_layer_sets(mcfg)
  new = dict(router_bias)
  for name in set(sets):
    set_load = sum(load[i] for i, s in enumerate(sets) if s == name)
    bias = router_bias[name]["moe"]["router"]["bias"]
    new[name] = {"moe": {"router": {"bias": update_router_bias(bias, set_load, gamma)}}}
  return new


def lm_eval(variables, batch: dict[str, jax.Array], mcfg: ModelConfig):
  """Summed next-token NLL, correct predictions and token count of one batch: the
  targets >= 0 (negative ones, e.g. an SL-CAI prompt, are ignored), weighted by
  batch["mask"] when it has one; kg arrays as in loss_fn."""
  logits, aux = Transformer(mcfg).apply(variables, batch["inputs"],
                                        kg=kg_inputs(batch, mcfg))      # (B, T, V)
  mask = batch.get("mask")
  valid = (batch["targets"] >= 0).astype(jnp.float32)                  # (B, T)
  n = jnp.sum(valid if mask is None else valid * mask)
  ce, acc = losses.cross_entropy(logits, batch["targets"], mask)
  out = {"nll_sum": ce * n, "correct": acc * n, "tokens": n}
  if aux:
    out["load"] = aux["load"]                                   # (L_moe, E) counts
    out["k_sum"] = jnp.sum(aux["k_per_token"], axis=(1, 2))     # (L_moe,) active experts
  return out


def variables_of(params, extra) -> dict[str, Any]:
  """Flax variables of the model: params, plus the router bias when there is one."""
  variables = {"params": params}
  if extra.get("router_bias"):
    variables["router_bias"] = extra["router_bias"]
  return variables


@functools.lru_cache(maxsize=32)
def _init_fn(mcfg: ModelConfig, seq_len: int):
  """The model's init, jitted once per config: run eagerly, every initializer and
  every layer of the init trace is dispatched and compiled op by op (hundreds of
  small compilations, most of a small run's start-up on a CPU)."""
  def init(rng):
    kg = example_inputs(mcfg, seq_len=seq_len) if mcfg.kg_fusion else None
    return Transformer(mcfg).init(rng, jnp.zeros((1, seq_len), jnp.int32), kg=kg)
  return jax.jit(init)


@functools.lru_cache(maxsize=32)
def _other_collections_fn(mcfg: ModelConfig, seq_len: int):
  init = _init_fn(mcfg, seq_len)
  return jax.jit(lambda rng: {k: v for k, v in init(rng).items() if k != "params"})


def model_init(mcfg: ModelConfig, seq_len: int, rng: jax.Array, params=None):
  """Boxed (logical-axis) model variables: fresh from `rng`, or with the values of
  `params` (copied: the train step donates its state, and the caller keeps its own)."""
  if params is None:
    return _init_fn(mcfg, seq_len)(rng)           # one compiled init per config
  # Given params, only the boxes' structure is needed: trace the init abstractly
  # (compiling it costs as much as a train step) and compute only the other
  # collections (the router bias), in one jit whose parameter init XLA drops.
  variables = jax.eval_shape(_init_fn(mcfg, seq_len), rng)
  if set(variables) - {"params"}:
    variables = {**variables, **_other_collections_fn(mcfg, seq_len)(rng)}
  boxed = variables["params"]
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  values = jax.tree.map(lambda p: jnp.copy(p), params)
  if jax.tree.structure(nn.meta.unbox(boxed)) != jax.tree.structure(values):
    raise ValueError("the given params do not match the model config's structure")
  new = jax.tree.map(lambda b, v: b.replace_boxed(v) if is_box(b) else v,
                     boxed, values, is_leaf=is_box)
  return {**variables, "params": new}


# TrainConfig fields the step never reads (when to log, evaluate, save; the init seed).
BOOKKEEPING_FIELDS = ("seed", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                      "keep_checkpoints", "on_nonfinite", "max_skipped_steps")
_DEFAULTS = TrainConfig()


def step_config(tcfg: TrainConfig) -> TrainConfig:
  """`tcfg` with the bookkeeping fields at their defaults: what a compiled step depends
  on, so runs that differ only in bookkeeping (or seed) share one executable."""
  return tcfg.replace(**{f: getattr(_DEFAULTS, f) for f in BOOKKEEPING_FIELDS})


def _lm_loss_and_eval(mcfg: ModelConfig, tcfg: TrainConfig, transform):
  return _lm_functions(mcfg, step_config(tcfg), transform)


@functools.lru_cache(maxsize=64)
def _lm_functions(mcfg: ModelConfig, tcfg: TrainConfig, transform):
  """The language model's loss and eval functions, one pair per (configs, transform):
  the same function objects across runs, so the compiled step is reused
  (step.compile_steps keys its cache on them)."""
  def loss(p, extra, batch, frozen, rng, step):
    del frozen, rng                            # deterministic: no dropout
    metrics = {}
    if transform is not None:
      p, extra, metrics = transform(p, extra, step)
    total, out = loss_fn(p, extra["router_bias"], batch, mcfg, tcfg)
    aux = out.pop("aux")
    if extra["router_bias"]:
      extra = {**extra, "router_bias": bias_update(extra["router_bias"], aux["load"], mcfg,
                                                   tcfg.bias_update_gamma)}
    metrics.update(out)
    if aux:
      metrics.update(load=aux["load"], dropped=jnp.mean(aux["dropped"]),
                     effective_k=jnp.mean(aux["effective_k"]),
                     **{f"effective_k/layer{i}": k
                        for i, k in enumerate(aux["effective_k"])})
    return total, (metrics, extra)

  return loss, _lm_evaluate(mcfg, transform)


@functools.lru_cache(maxsize=64)
def _lm_evaluate(mcfg: ModelConfig, transform):
  """The eval function, one per (model, transform): it reads no TrainConfig, so runs
  at other learning rates or lengths (a base and its fine-tunes) share its compile."""
  def evaluate(p, extra, batch, frozen):
    if transform is not None:
      p, extra, _ = transform(p, extra, None)
    return lm_eval(variables_of(p, extra), batch, mcfg)

  return evaluate


def lm_objective(mcfg: ModelConfig, tcfg: TrainConfig, seq_len: int, *,
                 params=None, router_bias=None, transform=None, name: str = "lm",
                 config: Mapping[str, Any] | None = None) -> Objective:
  """Next-token prediction. `params` / `router_bias` start from given values (a later
  stage, a fine-tune); `transform(params, extra, step) -> (params', extra', metrics)`
  runs before the forward pass (QAT's fake quantization and regrouping)."""
  def init(rng):
    variables = model_init(mcfg, seq_len, rng, params)
    bias = variables.get("router_bias", {})
    if router_bias is not None and bias:
      bias = jax.tree.map(jnp.asarray, router_bias)
    return variables["params"], {"router_bias": nn.meta.unbox(bias)}

  loss, evaluate = _lm_loss_and_eval(mcfg, tcfg, transform)
  return Objective(name=name, init=init, loss=loss, evaluate=evaluate,
                   config=dict(config or {}))
