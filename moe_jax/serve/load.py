"""Load a trained run for serving: the model config from the checkpoint's metadata,
then only the arrays serving needs (params and the router bias, not the optimizer).

    <workdir>/checkpoints/<step>/{state, data_state, meta, checksums}   (train/loop.py)
      meta["identity"]["model"]  -> ModelConfig          (nothing to retype)
      state.params, state.extra["router_bias"] -> {"params": ..., "router_bias": ...}
"""
from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import data as data_lib
from moe_jax.config import ModelConfig
from moe_jax.models.transformer import Transformer
from moe_jax.train.checkpoint import Checkpointer, CheckpointError

class CheckpointNotServable(RuntimeError):
  """There is no usable checkpoint in the work directory; the message names it."""


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  return os.path.abspath(os.path.join(os.fspath(workdir), "checkpoints"))


def _configs(meta: dict) -> dict:
  """The resolved configs a checkpoint records (meta["identity"], train/runs.py)."""
  configs = meta.get("identity") if isinstance(meta, dict) else None
  return configs if isinstance(configs, dict) else {}


def model_config_from_meta(meta: dict, where: str) -> ModelConfig:
  model = _configs(meta).get("model")
  if not isinstance(model, dict):
    raise CheckpointNotServable(f"{where}: its metadata has no model config (written "
                                f"by an older or foreign trainer?)")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(model) - fields)
  if unknown:
    raise CheckpointNotServable(f"{where}: model config fields {unknown} are unknown to "
                                f"this version of moe_jax")
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}
  try:
    return ModelConfig(**values)
  except (TypeError, ValueError) as e:
    raise CheckpointNotServable(f"{where}: invalid model config: {e}") from e


def load_run(workdir: str | os.PathLike, step: int | None = None,
             dtype: str | None = None) -> tuple[dict, ModelConfig, dict]:
  """-> (variables {"params", "router_bias"}, model config, meta) of a training run,
  read through the train Checkpointer (so checksum-verified). `dtype` ("bfloat16",
  ...) serves in another activation/parameter dtype."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise CheckpointNotServable(f"no checkpoint directory {directory} (is --workdir a "
                                f"training run's work directory?)")
  with Checkpointer(directory, save_every=1) as ckpt:
    steps = ckpt.all_steps()
    if not steps:
      raise CheckpointNotServable(f"no finished checkpoint in {directory}")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise CheckpointNotServable(f"no step {step} in {directory} (available: {steps})")
    where = f"checkpoint {directory}/{step}"
    try:
      _, meta = ckpt.read_json(step)
    except CheckpointError as e:
      raise CheckpointNotServable(f"{where}: cannot read its metadata: {e}") from e
    config = model_config_from_meta(meta or {}, where)
    # The abstract tree of what we need; the rest of the state is not read.
    shapes = jax.eval_shape(lambda: nn.meta.unbox(Transformer(config).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))))
    wanted = {"params": shapes["params"]}
    if shapes.get("router_bias"):
      wanted["extra"] = {"router_bias": shapes["router_bias"]}
    try:
      restored, _ = ckpt.restore_fields(wanted, step)
    except CheckpointError as e:
      raise CheckpointNotServable(
          f"{where}: its parameters do not match the model config in its metadata "
          f"or are corrupt ({e})") from e
  # orbax restores the stored shapes whatever the request says: compare them here.
  got = jax.tree_util.tree_flatten_with_path(restored)[0]
  expected = dict(jax.tree_util.tree_flatten_with_path(wanted)[0])
  for path, array in got:
    if path in expected and tuple(array.shape) != tuple(expected[path].shape):
      raise CheckpointNotServable(
          f"{where}: its parameters do not match the model config in its metadata: "
          f"{jax.tree_util.keystr(path)} has shape {tuple(array.shape)}, the config "
          f"needs {tuple(expected[path].shape)}")
  missing = set(expected) - {path for path, _ in got}
  if missing:
    raise CheckpointNotServable(
        f"{where}: its parameters do not match the model config in its metadata: "
        f"missing {sorted(jax.tree_util.keystr(p) for p in missing)[:3]}")
  variables = {"params": restored["params"],
               "router_bias": restored.get("extra", {}).get("router_bias") or {}}
  if dtype:
    config = config.replace(dtype=dtype, param_dtype=dtype)
    variables["params"] = jax.tree.map(lambda x: x.astype(dtype), variables["params"])
  return variables, config, meta


def attach_adapters(variables: dict, config: ModelConfig, path: str | os.PathLike,
                    merge: bool = False):
  """Serve LoRA adapters saved by `moe_jax.adapt.storage.save_adapters` with a run's
  weights: merged into them (base cost) or kept apart under "adapters" (the engine
  then needs `Engine(lora=cfg)`). -> (variables, LoraConfig). Adapters trained on
  another model config are refused, naming the fields that differ."""
  import dataclasses
  from moe_jax.adapt import lora, storage
  try:
    adapters, cfg = storage.load_adapters(path, base=dataclasses.asdict(config),
                                            ignore=("dtype", "param_dtype"))
  except (FileNotFoundError, ValueError) as e:
    raise CheckpointNotServable(f"--adapters {path}: {e}") from e
  adapters = jax.tree.map(jnp.asarray, adapters)
  if merge:
    return {**variables, "params": lora.merge(variables["params"], adapters, cfg)}, cfg
  return {**variables, "adapters": adapters}, cfg


def tokenizer_for(meta: dict):
  """The run's tokenizer (byte-level unless its data config names another)."""
  name = (_configs(meta).get("data") or {}).get("tokenizer", "byte")
  return data_lib.get_tokenizer(name)
