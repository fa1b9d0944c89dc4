"""Train state, optimizer and the jitted train / eval steps.

    loss = cross_entropy + balance_loss(aux) + z_loss(aux) + entropy_loss(aux)
    params <- AdamW(clip(grad))                    (frozen paths get zero updates)
    router_bias <- bias + gamma * sign(mean_load - load)   (outside the optimizer)
"""
from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from moe_jax import losses, sharding
from moe_jax.config import ModelConfig, TrainConfig
from moe_jax.models.router import update_router_bias
from moe_jax.models.transformer import Transformer, moe_layer_sets


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # () int32
  params: Any
  opt_state: Any
  router_bias: Any         # {} unless the model uses aux-loss-free balancing
  rng: jax.Array           # (2,) uint32 raw key, advanced every step


def learning_rate(tcfg: TrainConfig) -> optax.Schedule:
  """Linear warm-up, then cosine decay to lr * min_lr_ratio."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tcfg.lr, warmup_steps=tcfg.warmup_steps,
      decay_steps=tcfg.steps, end_value=tcfg.lr * tcfg.min_lr_ratio)


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def make_optimizer(tcfg: TrainConfig, params) -> optax.GradientTransformation:
  """AdamW (b1, b2 from the config) with global-norm clipping. Weight decay skips
  1-D parameters (norm scales, biases); paths matching `tcfg.freeze` are frozen."""
  decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.chain(
      optax.clip_by_global_norm(tcfg.grad_clip),
      optax.adamw(learning_rate(tcfg), b1=tcfg.b1, b2=tcfg.b2,
                  weight_decay=tcfg.weight_decay, mask=decay_mask))
  if not tcfg.freeze:
    return adamw
  frozen = [re.compile(f) for f in tcfg.freeze]
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if any(f.search(_path(path)) for f in frozen) else "train",
      params)
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)


def init_state(mcfg: ModelConfig, tcfg: TrainConfig, seq_len: int,
               params=None) -> TrainState:
  """A fresh state: new parameters from the seed, or the given ones (a later
  training stage starting from an earlier stage's model) with a new optimizer."""
  model = Transformer(mcfg)
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  init_key = jax.random.PRNGKey(tcfg.seed)
  variables = nn.meta.unbox(model.init(init_key, tokens))
  # A copy: the train step donates its state, and the caller keeps its parameters.
  params = variables["params"] if params is None else jax.tree.map(jnp.copy, params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=make_optimizer(tcfg, params).init(params),
                     router_bias=variables.get("router_bias", {}),
                     rng=jax.random.PRNGKey(tcfg.seed + 1))
  return state


def _bias_update(router_bias, load: jax.Array, mcfg: ModelConfig, gamma: float):
  """Sum each MoE layer's load into the router it used, then take one V3 step."""
  sets = moe_layer_sets(mcfg)
  new = dict(router_bias)
  for name in set(sets):
    set_load = sum(load[i] for i, s in enumerate(sets) if s == name)
    bias = router_bias[name]["moe"]["router"]["bias"]
    new[name] = {"moe": {"router": {"bias": update_router_bias(bias, set_load, gamma)}}}
  return new


def loss_fn(params, router_bias, batch, mcfg: ModelConfig, tcfg: TrainConfig):
  variables = {"params": params}
  if router_bias:
    variables["router_bias"] = router_bias
  logits, aux = Transformer(mcfg).apply(variables, batch["inputs"])
  ce, acc = losses.cross_entropy(logits, batch["targets"])
  balance = losses.balance_loss(aux, tcfg.balance_loss, tcfg.balance_alpha)
  z = losses.router_z_loss(aux["router_z"], tcfg.z_loss_alpha) if aux else 0.0
  ent = losses.router_entropy_loss(aux["router_entropy"], tcfg.entropy_loss_alpha) \
      if aux else 0.0
  return ce + balance + z + ent, dict(ce=ce, accuracy=acc, balance=balance, z_loss=z,
                                      entropy_loss=ent, aux=aux)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, mcfg: ModelConfig,
               tcfg: TrainConfig, objective=loss_fn
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW step. `objective` has loss_fn's signature; QAT passes one that
  fake-quantizes the parameters first (moe_jax.quant.qat)."""
  (loss, out), grads = jax.value_and_grad(objective, has_aux=True)(
      state.params, state.router_bias, batch, mcfg, tcfg)
  tx = make_optimizer(tcfg, state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  aux = out.pop("aux")
  router_bias = state.router_bias
  if router_bias:
    router_bias = _bias_update(router_bias, aux["load"], mcfg, tcfg.bias_update_gamma)
  metrics = dict(loss=loss, **out, grad_norm=optax.tree.norm(grads),
                 lr=learning_rate(tcfg)(state.step))
  if aux:
    metrics.update(load=aux["load"], dropped=jnp.mean(aux["dropped"]),
                   effective_k=jnp.mean(aux["effective_k"]),
                   **{f"effective_k/layer{i}": k for i, k in enumerate(aux["effective_k"])})
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            router_bias=router_bias, rng=jax.random.split(state.rng)[0])
  return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, mcfg: ModelConfig):
  """Summed next-token NLL, correct predictions and token count of one batch."""
  variables = {"params": state.params}
  if state.router_bias:
    variables["router_bias"] = state.router_bias
  logits, aux = Transformer(mcfg).apply(variables, batch["inputs"])
  n = batch["targets"].size
  ce, acc = losses.cross_entropy(logits, batch["targets"])
  out = {"nll_sum": ce * n, "correct": acc * n, "tokens": jnp.asarray(n, jnp.float32)}
  if aux:
    out["load"] = aux["load"]                                   # (L_moe, E) counts
    out["k_sum"] = jnp.sum(aux["k_per_token"], axis=(1, 2))     # (L_moe,) active experts
  return out


def jit_steps(mcfg: ModelConfig, tcfg: TrainConfig, mesh=None, state_sharding=None):
  """The jitted train and eval steps. On a mesh, the state keeps its layout across
  steps, the batch is split over the data axes, metrics come back replicated, and
  the steps trace under `jax.set_mesh(mesh)` so MoE layers run expert-parallel when
  the mesh has an `expert` axis."""
  train_kw, eval_kw = {}, {}
  if mesh is not None:
    batch = sharding.batch_sharding(mesh)
    train_kw = dict(in_shardings=(state_sharding, batch),
                    out_shardings=(state_sharding, sharding.replicated(mesh)))
    eval_kw = dict(in_shardings=(state_sharding, batch))
  train = jax.jit(functools.partial(train_step, mcfg=mcfg, tcfg=tcfg),
                  donate_argnums=0, **train_kw)
  evaluate = jax.jit(functools.partial(eval_step, mcfg=mcfg), **eval_kw)
  if mesh is None:
    return train, evaluate
  return sharding.under_mesh(train, mesh), sharding.under_mesh(evaluate, mesh)


def state_shardings(mcfg: ModelConfig, tcfg: TrainConfig, seq_len: int, mesh):
  """NamedShardings of the whole TrainState: parameters by their logical axis names,
  optimizer moments like their parameters, scalars replicated."""
  model = Transformer(mcfg)
  key = jax.random.PRNGKey(0)

  def boxed_state():
    variables = model.init(key, jnp.zeros((1, seq_len), jnp.int32))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=make_optimizer(tcfg, params).init(params),
                      router_bias=variables.get("router_bias", {}), rng=key)

  return sharding.logical_shardings(jax.eval_shape(boxed_state), mesh)
