"""Adapters saved and loaded on their own (orbax), without the base model.

    <dir>/lora.json     LoraConfig + the base model's config fingerprint
    <dir>/adapters/     orbax StandardCheckpointer of the {path: {a, b}} pytree

An r = 16 adapter of a small model is a few hundred KB against the base's MB; the
base is loaded once and any number of adapters are swapped on top of it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from moe_jax.adapt.lora import LoraConfig


def save_adapters(path: str | os.PathLike, adapters, cfg: LoraConfig,
                  base: dict | None = None) -> int:
  """Write `adapters` (and their config) to `path`; returns the bytes on disk.
  `base` (e.g. the ModelConfig as a dict) is stored so a mismatch can be caught."""
  path = Path(path).resolve()
  path.mkdir(parents=True, exist_ok=True)
  host = jax.tree.map(np.asarray, adapters)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / "adapters", host, force=True)
  (path / "lora.json").write_text(json.dumps(
      {"lora": dataclasses.asdict(cfg), "base": base or {}}, indent=1))
  return disk_bytes(path)


def load_adapters(path: str | os.PathLike, base: dict | None = None,
                  ignore: tuple[str, ...] = ()):
  """(adapters, LoraConfig) from `path`. With `base`, refuse adapters trained on a
  different model config (fields in `ignore`, e.g. a serving dtype, may differ)."""
  path = Path(path).resolve()
  meta_file = path / "lora.json"
  if not meta_file.exists():
    raise FileNotFoundError(f"{meta_file} not found: not an adapter directory "
                            f"(save_adapters writes lora.json and adapters/)")
  meta = json.loads(meta_file.read_text())
  lora = meta["lora"]
  cfg = LoraConfig(**{**lora, "targets": tuple(lora["targets"])})
  if base is not None and meta["base"]:
    base = json.loads(json.dumps(base))        # as stored: tuples become lists
    diff = sorted(k for k in set(base) | set(meta["base"])
                  if base.get(k) != meta["base"].get(k) and k not in ignore)
    if diff:
      raise ValueError(f"adapters in {path} were trained on another model config "
                       f"(fields differ: {diff})")
  with ocp.StandardCheckpointer() as ckptr:
    adapters = ckptr.restore(path / "adapters")
  return adapters, cfg


def disk_bytes(path: str | os.PathLike) -> int:
  """Total size of the files under `path`."""
  return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
