"""Hugging Face checkpoints in and out.

    python -m moe_jax.hf.convert --from-hf DIR --to runs/X [--dtype bfloat16]
    python -m moe_jax.hf.convert --from-run runs/X --to-hf OUT_DIR

    DIR/config.json ─ archs.to_model_config ─> ModelConfig
    DIR/*.safetensors ─ tensor by tensor, archs.tensor_rules ─> params (numpy, one copy)
        ─> runs/X/checkpoints/0/{state, data_state, meta}   (train.checkpoint layout)
    DIR/tokenizer.json ...  ─ copied ─> runs/X/ (loaded with `tokenizers`, tokenizer.py)
    DIR/config.json ─ copied ─> runs/X/hf_config.json (and meta["hf"]["config"])

The run directory is what `moe_jax.train` writes: the `state` item is a TrainState
(step 0, the parameters, a fresh AdamW state of the default TrainConfig, the router
bias, an rng key) and meta["identity"]["model"] is the ModelConfig as a dict, so anything that
restores a training checkpoint (generation, serving, fine-tuning) loads it as is.
The optimizer moments are zeros shared between leaves of one shape, so they cost
about one layer's worth of memory. Export writes one safetensors shard per layer plus
`model.safetensors.index.json`, so it never holds a second full copy either.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import ModelConfig, TrainConfig
from moe_jax.hf import archs
from moe_jax.hf.safetensors_io import SafetensorsDir, write_safetensors
from moe_jax.models.counting import abstract_params
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.step import TrainState, init_state, make_optimizer

SAVE_CONCURRENT_GB = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def read_hf_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config.json in {directory}")
  with open(path) as f:
    return json.load(f)


def _flat(tree, prefix="") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _unflat(flat: dict[str, Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def import_hf(directory: str, dtype: str | None = None):
  """Reads a HF checkpoint directory -> (ModelConfig, params, router_bias, hf config,
  arch). Arrays are numpy in the config's param_dtype (router bias: float32).

  Raises archs.UnsupportedModelError (architecture / setting) or
  safetensors_io.MissingTensorError (a tensor the model needs is absent)."""
  hf = read_hf_config(directory)
  arch = archs.architecture_of(hf)
  config = archs.to_model_config(hf, dtype)
  shapes = {k: v.shape for k, v in _flat(abstract_params(config)).items()}
  pdtype = jnp.dtype(config.param_dtype)
  files = SafetensorsDir(directory)
  params, bias = {}, {}
  for rule in archs.tensor_rules(config, arch, hf):
    # Only one rule's tensors (at most one layer's experts) are held at a time.
    outs = rule.load(*[files.get(name) for name in rule.theirs])
    for path, value in zip(rule.ours, outs):
      if path.startswith("router_bias:"):
        bias[path.split(":", 1)[1]] = np.asarray(value, np.float32)
        continue
      if value.shape != shapes[path]:
        raise ValueError(f"{rule.theirs[0]}: shape {value.shape} after conversion, "
                         f"the model needs {shapes[path]} for {path}")
      # A host (CPU) jax array per tensor: orbax writes jax arrays without staging
      # a copy (numpy arrays it copies), and the numpy original is freed at once.
      params[path] = jax.device_put(np.asarray(value, pdtype), _host())
  missing = sorted(set(shapes) - set(params))
  if missing:  # a rule table gap, not a user error
    raise RuntimeError(f"{arch}: no rule fills the parameters {missing}")
  return config, _unflat(params), _unflat(bias), hf, arch


def _host():
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:   # JAX_PLATFORMS excludes the CPU backend
    return jax.devices()[0]


def _zeros_like_tree(abstract):
  """Zeros for every leaf, one shared (immutable) host array per shape and dtype: the
  AdamW moments of 27 identical layers cost one layer's worth of memory."""
  cache = {}

  def zeros(s):
    key = (tuple(s.shape), jnp.dtype(s.dtype))
    if key not in cache:
      cache[key] = jax.device_put(np.zeros(s.shape, s.dtype), _host())
    return cache[key]
  return jax.tree.map(zeros, abstract)


def save_run(workdir: str, config: ModelConfig, params, router_bias, *,
             meta: dict | None = None) -> str:
  """Writes params as step 0 of a training checkpoint in `workdir`/checkpoints, with
  the train Checkpointer (so with its checksums), at most SAVE_CONCURRENT_GB of arrays
  in flight."""
  tcfg = TrainConfig()
  abstract_opt = jax.eval_shape(make_optimizer(tcfg, params).init,
                                jax.tree.map(lambda a: jax.ShapeDtypeStruct(
                                    a.shape, a.dtype), params))
  # Fresh AdamW moments are zeros (and its step count 0): what TrainState.create makes,
  # built without a second copy of the parameters.
  state = TrainState(step=np.zeros((), np.int32), params=params,
                     opt_state=_zeros_like_tree(abstract_opt),
                     extra={"router_bias": router_bias or {}},
                     rng=np.asarray(jax.random.PRNGKey(tcfg.seed + 1)))
  # The configs where a training run keeps them (meta["identity"], train/runs.py).
  meta = dict(meta or {})
  identity = {"model": dataclasses.asdict(config), "train": dataclasses.asdict(tcfg)}
  if "data" in meta:
    identity["data"] = meta.pop("data")
  full_meta = {"identity": identity, "history": [], "load_history": [], **meta}
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  with Checkpointer(directory, save_every=1, keep=1,
                    save_concurrent_gb=SAVE_CONCURRENT_GB) as ckpt:
    ckpt.maybe_save(0, state, data_state={}, meta=full_meta, force=True)
  return directory


def read_meta(workdir: str) -> dict:
  """meta of the latest checkpoint in `workdir`/checkpoints (JSON, no arrays read)."""
  with Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=1) as ckpt:
    return ckpt.read_json()[1]


def load_run(workdir: str):
  """(ModelConfig, params, router_bias, meta) of the latest checkpoint of a run."""
  meta = read_meta(workdir)
  model = dict(meta["identity"]["model"])
  fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
  for k, v in model.items():   # JSON turns tuples into lists
    if isinstance(v, list) and k in fields:
      model[k] = tuple(v)
  config = ModelConfig(**model)
  abstract = jax.eval_shape(lambda: init_state(config, TrainConfig(), 8))
  with Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=1) as ckpt:
    state, _, meta = ckpt.restore(abstract)
  return config, state.params, state.router_bias, meta


def export_hf(config: ModelConfig, params, router_bias, out_dir: str, *, arch: str,
              base_config: dict | None = None) -> list[str]:
  """Writes `out_dir`/config.json and safetensors shards (one per layer + one for the
  embeddings) with `model.safetensors.index.json`. Returns the shard names."""
  os.makedirs(out_dir, exist_ok=True)
  flat = {k: np.asarray(v) for k, v in _flat(jax.device_get(params)).items()}
  flat.update({f"router_bias:{k}": np.asarray(v)
               for k, v in _flat(jax.device_get(router_bias or {})).items()})
  groups: dict[str, dict[str, np.ndarray]] = {}
  for rule in archs.tensor_rules(config, arch, base_config):
    outs = rule.save(*[flat[p] for p in rule.ours])
    for name, value in zip(rule.theirs, outs):
      group = name.split(".")[2] if name.startswith("model.layers.") else "other"
      groups.setdefault(group, {})[name] = value
  order = sorted((g for g in groups if g != "other"), key=int) + ["other"]
  weight_map, total, shards = {}, 0, []
  for i, group in enumerate(order):
    shard = f"model-{i + 1:05d}-of-{len(order):05d}.safetensors"
    tensors = groups.pop(group)
    weight_map.update({n: shard for n in tensors})
    total += write_safetensors(os.path.join(out_dir, shard), tensors)
    shards.append(shard)
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(
        weight_map.items()))}, f, indent=2)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(archs.to_hf_config(config, arch, base_config), f, indent=2)
  return shards


def convert_from_hf(src: str, workdir: str, dtype: str | None = None) -> dict:
  """The `--from-hf` command as a function; returns a summary dict."""
  t0 = time.perf_counter()
  config, params, bias, hf, arch = import_hf(src, dtype)
  os.makedirs(workdir, exist_ok=True)
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), os.path.join(workdir, name))
      copied.append(name)
  shutil.copy(os.path.join(src, "config.json"), os.path.join(workdir, "hf_config.json"))
  meta = {"hf": {"architecture": arch, "source": os.path.abspath(src), "config": hf},
          "tokenizer": "tokenizer.json" if "tokenizer.json" in copied else None}
  if meta["tokenizer"]:   # where a training run records its tokenizer (DataConfig)
    meta["data"] = {"tokenizer": os.path.abspath(os.path.join(workdir, "tokenizer.json"))}
  save_run(workdir, config, params, bias, meta=meta)
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  return {"architecture": arch, "parameters": n, "seconds": time.perf_counter() - t0,
          "tokenizer": meta["tokenizer"], "workdir": os.path.abspath(workdir)}


def export_run(workdir: str, out_dir: str, arch: str | None = None) -> list[str]:
  config, params, bias, meta = load_run(workdir)
  hf_meta = meta.get("hf") or {}
  arch = arch or hf_meta.get("architecture")
  if arch is None:
    raise ValueError(f"{workdir} was not imported from Hugging Face: pass --arch "
                     f"(one of {sorted(archs.MODEL_TYPES)})")
  shards = export_hf(config, params, bias, out_dir, arch=arch,
                     base_config=hf_meta.get("config"))
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(workdir, name)):
      shutil.copy(os.path.join(workdir, name), os.path.join(out_dir, name))
  return shards


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--from-hf", help="a local HF checkpoint directory (config.json + "
                 "*.safetensors) to import")
  p.add_argument("--to", help="the run directory to write (with --from-hf)")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                 help="parameter dtype (default: the checkpoint's)")
  p.add_argument("--from-run", help="a run directory to export")
  p.add_argument("--to-hf", help="the HF directory to write (with --from-run)")
  p.add_argument("--arch", choices=sorted(archs.MODEL_TYPES),
                 help="export architecture (default: the one imported)")
  args = p.parse_args(argv)
  if args.from_hf and args.to:
    summary = convert_from_hf(args.from_hf, args.to, args.dtype)
    print(f"{summary['architecture']}: {summary['parameters']:,} parameters -> "
          f"{summary['workdir']} in {summary['seconds']:.1f} s "
          f"(tokenizer: {summary['tokenizer']})")
    return 0
  if args.from_run and args.to_hf:
    shards = export_run(args.from_run, args.to_hf, args.arch)
    print(f"wrote {len(shards)} shards + config.json to {args.to_hf}")
    return 0
  p.error("use --from-hf DIR --to RUN, or --from-run RUN --to-hf DIR")
  return 2


if __name__ == "__main__":
  raise SystemExit(main())
