"""Meshes and logical-axis rules: how parameters and batches are laid over devices.

Model code names the axes of every parameter ("embed", "expert", "mlp", ...); a
rule table maps each logical name to mesh axes. The same model then runs on one CPU,
8 simulated CPU devices, a GPU node or a pod by changing only the mesh.

Mesh axes: data (batch), fsdp (batch + parameter shards), expert (expert
parallelism), tensor (within-layer model parallelism).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical name -> mesh axes. Batch rows are split over every data-like axis;
# experts over `expert`; hidden widths over `tensor`; the model width over `fsdp`.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("norm", None),
    ("latent", "fsdp"),        # MLA's compressed query / KV width (kv_lora_rank)
)


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1,
              devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = (data, fsdp, expert, tensor)
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} x expert={expert} x tensor={tensor}"
                     f" = {math.prod(shape)} devices, but {len(devices)} are available")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def single_device_mesh() -> Mesh:
  return make_mesh(devices=jax.devices()[:1])


def logical_shardings(boxed_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a tree of `nn.LogicallyPartitioned` boxes (e.g. the output of
  `jax.eval_shape(model.init, ...)`); unboxed leaves are replicated."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of a (B, ...) batch split over the data-like axes."""
  return NamedSharding(mesh, P(("data", "fsdp", "expert")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def under_mesh(fn, mesh: Mesh):
  """`fn` called (and so traced) with `mesh` as the current mesh."""
  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)
  return call
