"""Train state, optimizer and the one jitted train step (any `Objective`).

    rng_t, rng'  = split(rng)
    (loss, (metrics, extra')), grads = value_and_grad(objective.loss)(params, extra,
                                                      batch, frozen, rng_t, step)
    params', opt' = AdamW(clip(grads))              (frozen paths get zero updates)
    ok = finite(loss) & finite(|grads|) & finite(params', opt', extra')
    state' = (step+1, ok ? params' : params, ok ? opt' : opt, ok ? extra' : extra, rng')

The guard is inside the jitted step, so a non-finite step never reaches the state:
every state the loop can checkpoint is finite, and the `finite` metric tells the
loop which steps were refused (stop, or skip and go on: TrainConfig.on_nonfinite).
"""
from __future__ import annotations

import collections
import functools
import re
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from moe_jax import sharding
from moe_jax.config import ModelConfig, TrainConfig
from moe_jax.train.objective import (Objective, lm_eval, lm_objective, loss_fn,
                                     step_config, variables_of)

__all__ = ["TrainState", "learning_rate", "make_optimizer", "train_step", "compile_steps",
           "abstract_state", "new_state", "init_state", "state_shardings", "jit_steps",
           "eval_step", "loss_fn"]


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # () int32, steps taken
  params: Any              # trained
  opt_state: Any
  extra: Any               # carried, not trained (router bias, QAT groups, ...)
  rng: jax.Array           # (2,) uint32 raw key, split every step for the objective

  @property
  def router_bias(self):
    """The model's aux-loss-free router bias ({} when it has none)."""
    return self.extra.get("router_bias", {}) if isinstance(self.extra, dict) else {}

  @classmethod
  def create(cls, params, extra, tx: optax.GradientTransformation, seed: int
             ) -> "TrainState":
    """The one constructor: step 0, a fresh optimizer state, the step key from seed."""
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               extra=extra, rng=jax.random.PRNGKey(seed + 1))


def learning_rate(tcfg: TrainConfig) -> optax.Schedule:
  """Linear warm-up, then cosine decay to lr * min_lr_ratio."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tcfg.lr, warmup_steps=tcfg.warmup_steps,
      decay_steps=tcfg.steps, end_value=tcfg.lr * tcfg.min_lr_ratio)


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def make_optimizer(tcfg: TrainConfig, params, schedule=None) -> optax.GradientTransformation:
  """AdamW (b1, b2 from the config) with global-norm clipping. Weight decay skips
  1-D parameters (norm scales, biases); paths matching `tcfg.freeze` are frozen."""
  decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.chain(
      optax.clip_by_global_norm(tcfg.grad_clip),
      optax.adamw(schedule or learning_rate(tcfg), b1=tcfg.b1, b2=tcfg.b2,
                  weight_decay=tcfg.weight_decay, mask=decay_mask))
  if not tcfg.freeze:
    return adamw
  frozen = [re.compile(f) for f in tcfg.freeze]
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if any(f.search(_path(path)) for f in frozen) else "train",
      params)
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)


def _schedule(objective: Objective, tcfg: TrainConfig):
  return objective.schedule(tcfg) if objective.schedule else learning_rate(tcfg)


def _optimizer(objective: Objective, tcfg: TrainConfig, params):
  return make_optimizer(tcfg, params, _schedule(objective, tcfg))


def _all_finite(*trees) -> jax.Array:
  """() bool: every float in the trees is finite (one fused reduction per leaf)."""
  flags = [jnp.all(jnp.isfinite(x)) for tree in trees for x in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def train_step(state: TrainState, batch: dict[str, jax.Array], frozen=None, *,
               objective: Objective, tcfg: TrainConfig
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One guarded AdamW step of `objective` (see the module docstring)."""
  step_rng, rng = jax.random.split(state.rng)
  loss_and_grad = jax.value_and_grad(objective.loss, has_aux=True)
  (loss, (metrics, extra)), grads = loss_and_grad(state.params, state.extra, batch, frozen,
                                                  step_rng, state.step)
  tx = _optimizer(objective, tcfg, state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  ok = _all_finite(loss, grad_norm, params, opt_state, extra)
  # A refused step keeps the old values; XLA fuses the select into the update.
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                            opt_state=keep(opt_state, state.opt_state),
                            extra=keep(extra, state.extra), rng=rng)
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                 lr=_schedule(objective, tcfg)(state.step), finite=ok)
  return new_state, metrics


def abstract_state(objective: Objective, tcfg: TrainConfig) -> TrainState:
  """The state's shapes and dtypes, with the objective's logical-axis boxes."""
  def boxed():
    params, extra = objective.init(jax.random.PRNGKey(tcfg.seed))
    return TrainState.create(params, extra, _optimizer(objective, tcfg, params), tcfg.seed)
  return jax.eval_shape(boxed)


def new_state(objective: Objective, tcfg: TrainConfig) -> TrainState:
  """A fresh state of `objective` (params from its init, a new optimizer)."""
  params, extra = nn.meta.unbox(objective.init(jax.random.PRNGKey(tcfg.seed)))
  return TrainState.create(params, extra, _optimizer(objective, tcfg, params), tcfg.seed)


_COMPILED: collections.OrderedDict = collections.OrderedDict()


def compile_steps(objective: Objective, tcfg: TrainConfig, mesh=None, state_sharding=None):
  """The jitted train step `(state, batch, frozen) -> (state, metrics)` (state donated)
  and eval step `(state, batch, frozen) -> sums` (None without `objective.evaluate`).
  On a mesh the state keeps its layout across steps, metrics come back replicated,
  and the steps trace under `jax.set_mesh(mesh)` so MoE layers run expert-parallel
  when the mesh has an `expert` axis. Inputs keep the shardings they were put with.

  Cached on the objective's functions, the config, the mesh and the state layout:
  runs of the same objective in one process (resume tests, seeds of an ablation that
  share a config) reuse one compiled executable."""
  tcfg = step_config(tcfg)
  key = (objective.loss, objective.evaluate, objective.schedule, tcfg, mesh,
         None if state_sharding is None else
         (jax.tree.structure(state_sharding), tuple(jax.tree.leaves(state_sharding))))
  if key not in _COMPILED:
    _COMPILED[key] = _compile_steps(objective, tcfg, mesh, state_sharding)
    while len(_COMPILED) > 32:
      _COMPILED.popitem(last=False)
  return _COMPILED[key]


def _compile_steps(objective: Objective, tcfg: TrainConfig, mesh, state_sharding):
  kw = {}
  if mesh is not None:
    kw = dict(out_shardings=(state_sharding, sharding.replicated(mesh)))
  train = jax.jit(functools.partial(train_step, objective=objective, tcfg=tcfg),
                  donate_argnums=0, **kw)
  evaluate = objective.evaluate and _compile_eval(objective.evaluate, mesh)
  if mesh is None:
    return train, evaluate
  return sharding.under_mesh(train, mesh), evaluate


@functools.lru_cache(maxsize=32)
def _compile_eval(evaluate, mesh):
  """One jitted eval per eval function (objectives that share it share the executable,
  e.g. the distillation stages of one student). It takes params and extra, not the
  state: runs whose optimizer states differ (a frozen stage) share one compile."""
  fn = jax.jit(evaluate)                    # (params, extra, batch, frozen) -> sums
  fn = fn if mesh is None else sharding.under_mesh(fn, mesh)
  return lambda state, batch, frozen: fn(state.params, state.extra, batch, frozen)


# ---------------------------------------------------------------------------------
# The language-model shortcuts (tests, benchmarks, loading a checkpoint)
# ---------------------------------------------------------------------------------

def init_state(mcfg: ModelConfig, tcfg: TrainConfig, seq_len: int,
               params=None) -> TrainState:
  """A fresh language-model state: new parameters from the seed, or the given ones
  (a later training stage starting from an earlier stage's model)."""
  return new_state(lm_objective(mcfg, tcfg, seq_len, params=params), tcfg)


def state_shardings(mcfg: ModelConfig, tcfg: TrainConfig, seq_len: int, mesh):
  """NamedShardings of the whole language-model TrainState: parameters by their
  logical axis names, optimizer moments like their parameters, scalars replicated."""
  return sharding.logical_shardings(
      abstract_state(lm_objective(mcfg, tcfg, seq_len), tcfg), mesh)


def jit_steps(mcfg: ModelConfig, tcfg: TrainConfig, mesh=None, state_sharding=None):
  """The language model's jitted `train(state, batch)` and `evaluate(state, batch)`."""
  train, evaluate = compile_steps(lm_objective(mcfg, tcfg, 0), tcfg, mesh, state_sharding)
  return (lambda state, batch: train(state, batch, None),
          lambda state, batch: evaluate(state, batch, None))


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, mcfg: ModelConfig):
  """Summed next-token NLL, correct predictions and token count of one batch."""
  return lm_eval(variables_of(state.params, state.extra), batch, mcfg)
