"""Fine-tuning through the one training loop: LoRA, and the source's two stages.

    lr(step) = lr0 * decay ** floor(step / steps_per_epoch)      (1e-5, x0.95 / epoch)

    LoRA:       params = adapters (trained)   frozen = {"base": model params}
                loss   = LM loss of adapted(base, adapters)        (lora.py)
    two-stage:  stage 1  epochs [0, b): freeze the lower layers, train the top
                         ("top"), or train only LoRA adapters ("adapters")
                stage 2  epochs [b, n): train everything, from stage 1's model
                         (adapters merged), the staircase continuing where it was

The boundary b (`stage1_epochs`) and the frozen layers (`frozen_layers`) are
configurable. "Lower layers" are parameter sets: a set shared by a frozen layer and
a trained one stays frozen (otherwise the frozen layer would change); the embedding
is frozen with them unless `freeze_embedding=False` (tied embeddings are the output
head as well).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from moe_jax import data as data_lib
from moe_jax.adapt import lora as lora_lib
from moe_jax.config import ModelConfig, TrainConfig, require
from moe_jax.models.sharing import make_plan
from moe_jax.train import loop
from moe_jax.train.objective import (Objective, bias_update, lm_eval, lm_objective, loss_fn,
                                     step_config, variables_of)

STAGE1 = ("top", "adapters")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """The source's fine-tuning recipe: lr 1e-5, x0.95 per epoch, two stages."""
  lr: float = 1e-5
  lr_decay: float = 0.95          # multiplied in once per epoch (staircase)
  epochs: float = 3.0             # passes over the finite fine-tuning set
  stage1_epochs: float = 1.0      # stage boundary (0: one stage, everything trained)
  stage1: str = "top"             # "top": freeze lower layers; "adapters": LoRA only
  frozen_layers: int = -1         # lower layers frozen in stage 1 (-1: half of them)
  freeze_embedding: bool = True

  def __post_init__(self):
    self.validate()

  def replace(self, **overrides: Any) -> "FinetuneConfig":
    return dataclasses.replace(self, **overrides)

  def validate(self) -> None:
    need = functools.partial(require, self)
    need(self.lr > 0, "lr", "must be > 0")
    need(0 < self.lr_decay <= 1, "lr_decay", "must be in (0, 1]")
    need(self.epochs > 0, "epochs", "must be > 0")
    need(0 <= self.stage1_epochs < self.epochs, "stage1_epochs",
         f"must be in [0, epochs={self.epochs})")
    need(self.stage1 in STAGE1, "stage1", f"must be one of {STAGE1}")
    need(self.frozen_layers >= -1, "frozen_layers", "must be >= 0, or -1 (half)")


def staircase_lr(lr: float, decay: float, steps_per_epoch: int,
                 offset: int = 0) -> optax.Schedule:
  """lr * decay ** floor((step + offset) / steps_per_epoch); `offset` continues the
  staircase in a later stage whose step counter starts at 0."""
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1")
  sched = optax.exponential_decay(init_value=lr, transition_steps=steps_per_epoch,
                                  decay_rate=decay, staircase=True)
  return lambda step: sched(step + offset)


@functools.lru_cache(maxsize=64)
def staircase(lr: float, decay: float, steps_per_epoch: int, offset: int = 0):
  """`staircase_lr` as an Objective schedule (TrainConfig -> optax schedule): one
  function object per arguments, so runs that differ only in seed share one compiled
  step (step.compile_steps keys its cache on the schedule)."""
  sched = staircase_lr(lr, decay, steps_per_epoch, offset)
  return lambda _tcfg: sched


def epoch_steps(dcfg: data_lib.DataConfig, domain: str, corpus=None) -> int:
  """Steps in one pass over `domain`'s training rows (the finite fine-tuning set)."""
  corpus = corpus or data_lib.corpus_from_config(dcfg)
  rows = data_lib.packed_rows(corpus, domain, "train", data_lib.get_tokenizer(dcfg.tokenizer),
                              dcfg.seq_len)
  if len(rows) < dcfg.batch_size:
    raise ValueError(f"the {domain!r} training set has {len(rows)} rows of "
                     f"{dcfg.seq_len} tokens, fewer than one batch ({dcfg.batch_size})")
  return len(rows) // dcfg.batch_size


def lower_layer_freeze(mcfg: ModelConfig, n_frozen: int,
                       freeze_embedding: bool = True) -> tuple[str, ...]:
  """Regexes (TrainConfig.freeze) of the parameter sets used by layers < n_frozen."""
  if not 0 <= n_frozen <= mcfg.n_layers:
    raise ValueError(f"frozen_layers={n_frozen} must be in [0, n_layers={mcfg.n_layers}]")
  plan, nd = make_plan(mcfg), mcfg.n_dense_layers
  sets = set()
  for layer in range(n_frozen):
    sets.add(f"attn_{plan.attn[layer]}")
    sets.add(f"dense_ffn_{plan.ffn[layer]}" if layer < nd else f"moe_ffn_{plan.ffn[layer]}")
  return ((r"^embed$",) if freeze_embedding and n_frozen else ()) + tuple(
      f"^{s}/" for s in sorted(sets))


def lora_objective(mcfg: ModelConfig, tcfg: TrainConfig, lcfg: lora_lib.LoraConfig,
                   base_params, *, router_bias=None, schedule=None,
                   config: dict | None = None) -> Objective:
  """Train adapters on a frozen base: pass `frozen={"base": base_params}` to
  `train`. `base_params` only fixes the adapter shapes here (it is not captured)."""
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base_params)
  bias = router_bias or {}

  def init(rng):
    # A copy: the train step donates its state, and the caller keeps its bias.
    return lora_lib.init_adapters(shapes, lcfg, rng), {
        "router_bias": jax.tree.map(jnp.copy, bias)}

  loss, evaluate = _lora_functions(mcfg, step_config(tcfg), lcfg)
  return Objective(name="lora", init=init, loss=loss, evaluate=evaluate,
                   config={"lora": dataclasses.asdict(lcfg), **(config or {})},
                   schedule=schedule)


@functools.lru_cache(maxsize=32)
def _lora_functions(mcfg: ModelConfig, tcfg: TrainConfig, lcfg: lora_lib.LoraConfig):
  """LoRA's loss and eval, one pair per configs: the same function objects for every
  seed, so the compiled step is reused (as objective._lm_functions does)."""
  def loss(adapters, extra, batch, frozen, rng, step):
    del step
    params = lora_lib.adapted(frozen["base"], adapters, lcfg,
                              rng if lcfg.dropout > 0 else None)
    total, out = loss_fn(params, extra["router_bias"], batch, mcfg, tcfg)
    aux = out.pop("aux")
    if extra["router_bias"]:
      extra = {**extra, "router_bias": bias_update(extra["router_bias"], aux["load"], mcfg,
                                                   tcfg.bias_update_gamma)}
    if aux:
      out.update(load=aux["load"], dropped=aux["dropped"].mean())
    return total, (out, extra)

  def evaluate(adapters, extra, batch, frozen):
    params = lora_lib.adapted(frozen["base"], adapters, lcfg)
    return lm_eval(variables_of(params, extra), batch, mcfg)

  return loss, evaluate


def full_objective(mcfg: ModelConfig, tcfg: TrainConfig, params, *, router_bias=None,
                   schedule=None, config: dict | None = None) -> Objective:
  """Full fine-tuning from `params` (TrainConfig.freeze still applies)."""
  # A copy of the bias: the train step donates its state, and the caller keeps its own.
  bias = jax.tree.map(jnp.copy, router_bias) if router_bias else router_bias
  obj = lm_objective(mcfg, tcfg, min(8, mcfg.max_seq_len), params=params, router_bias=bias,
                     name="finetune", config=config)
  return dataclasses.replace(obj, schedule=schedule)


@dataclasses.dataclass
class TwoStageResult:
  stage1: loop.RunResult
  stage2: loop.RunResult | None
  params: Any                     # the final model's params (adapters merged)
  router_bias: Any


def two_stage(mcfg: ModelConfig, dcfg: data_lib.DataConfig, tcfg: TrainConfig,
              fcfg: FinetuneConfig, workdir: str, *, base_params, router_bias=None,
              steps_per_epoch: int, lcfg: lora_lib.LoraConfig | None = None,
              config: dict | None = None, **train_kw) -> TwoStageResult:
  """The source's two stages through `loop.train` (see the module docstring).
  `tcfg` gives everything but steps, lr schedule and freeze, which come from `fcfg`."""
  total = max(1, round(fcfg.epochs * steps_per_epoch))
  boundary = round(fcfg.stage1_epochs * steps_per_epoch)
  sched = lambda offset: staircase(fcfg.lr, fcfg.lr_decay, steps_per_epoch, offset)
  ident = {"finetune": dataclasses.asdict(fcfg), **(config or {})}
  params, bias, first = base_params, router_bias, None
  if boundary:
    t1 = tcfg.replace(steps=boundary, lr=fcfg.lr, warmup_steps=0)
    if fcfg.stage1 == "top":
      n = mcfg.n_layers // 2 if fcfg.frozen_layers < 0 else fcfg.frozen_layers
      t1 = t1.replace(freeze=lower_layer_freeze(mcfg, n, fcfg.freeze_embedding))
      obj, frozen = full_objective(mcfg, t1, base_params, router_bias=router_bias,
                                   schedule=sched(0), config=ident), None
    else:
      lcfg = lcfg or lora_lib.LoraConfig()
      obj = lora_objective(mcfg, t1, lcfg, base_params, router_bias=router_bias,
                           schedule=sched(0), config=ident)
      frozen = {"base": base_params}
    first = loop.train(mcfg, dcfg, t1, f"{workdir}/stage1", objective=obj, frozen=frozen,
                       **train_kw)
    params = (first.state.params if fcfg.stage1 == "top"
              else lora_lib.merge(base_params, first.state.params, lcfg))
    bias = first.state.extra["router_bias"] or router_bias
  t2 = tcfg.replace(steps=total - boundary, lr=fcfg.lr, warmup_steps=0, freeze=())
  # Stage 2 reads on where stage 1 stopped in the stream (another epoch, not a replay).
  kw = dict(train_kw)
  if first is not None:
    kw["data_state"] = first.data_state
  second = loop.train(mcfg, dcfg, t2, f"{workdir}/stage2",
                      objective=full_objective(mcfg, t2, params, router_bias=bias,
                                               schedule=sched(boundary), config=ident),
                      **kw)
  return TwoStageResult(stage1=first, stage2=second, params=second.state.params,
                        router_bias=second.state.extra["router_bias"])

