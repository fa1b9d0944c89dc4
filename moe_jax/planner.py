"""Mesh presets and a memory / communication planner.

    python -m moe_jax.planner --model seed_24l --mesh gpu_pod_64
    python -m moe_jax.planner --model deepseek_v3 --mesh gpu_pod_512 --batch-tokens 4194304
    python -m moe_jax.planner --model deepseek_v2_lite --mesh gpu_1 --inference \
        --batch 8 --seq-len 32768                         # serving: weights + KV cache

A preset is a mesh shape (data, fsdp, expert, tensor) plus what the planner needs
to know about the hardware. `plan()` lays every parameter over the mesh with the
logical-axis rules of `moe_jax.sharding` (the same rules training uses), then
estimates per-device memory (parameters, AdamW state, gradients, activations of one
batch) and the bytes each device sends per step, and refuses with a clear message
what cannot work. Estimates, not measurements: they ignore XLA's temporary buffers
and fragmentation, so leave ~20% headroom.
"""
from __future__ import annotations

import argparse
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import sharding
from moe_jax.config import ModelConfig, get_config
from moe_jax.models.counting import count_params
from moe_jax.models.transformer import Transformer

GB = 1e9


@dataclasses.dataclass(frozen=True)
class MeshPreset:
  description: str
  mesh: dict[str, int]          # data, fsdp, expert, tensor sizes
  device: str
  device_memory_gb: float
  devices_per_node: int
  intra_node_gbs: float         # per-device bandwidth inside a node (NVLink / ICI), GB/s
  inter_node_gbs: float         # per-device bandwidth across nodes (InfiniBand / DCN), GB/s
  peak_tflops: float            # dense bf16

  @property
  def n_devices(self) -> int:
    return math.prod(self.mesh.values())


# Bandwidths are per device and one direction: NVLink 4 (H100/H200) 450 GB/s,
# 400 Gb/s InfiniBand per GPU = 50 GB/s, TPU v5p ICI ~ 600 GB/s per chip.
PRESETS: dict[str, MeshPreset] = {
    "cpu_1": MeshPreset("one CPU (laptop, CI)", dict(data=1, fsdp=1, expert=1, tensor=1),
                        "CPU", 24, 1, 0, 0, 0.1),
    "cpu_8_simulated": MeshPreset(
        "8 simulated CPU devices (tests): data 2 x expert 4",
        dict(data=2, fsdp=1, expert=4, tensor=1), "CPU", 3, 8, 10, 10, 0.01),
    "gpu_1": MeshPreset("one H200 GPU", dict(data=1, fsdp=1, expert=1, tensor=1),
                        "H200", 141, 1, 450, 50, 989),
    "gpu_node_8": MeshPreset(
        "one 8-GPU H200 node: experts over all 8 GPUs (the batch too)",
        dict(data=1, fsdp=1, expert=8, tensor=1), "H200", 141, 8, 450, 50, 989),
    "gpu_node_8_h100": MeshPreset(
        "one 8-GPU H100 node: experts over all 8 GPUs (the batch too)",
        dict(data=1, fsdp=1, expert=8, tensor=1), "H100", 80, 8, 450, 50, 989),
    "gpu_pod_64": MeshPreset(
        "8 nodes x 8 H200: FSDP across nodes, experts within a node",
        dict(data=1, fsdp=8, expert=8, tensor=1), "H200", 141, 8, 450, 50, 989),
    "gpu_pod_512": MeshPreset(
        "64 nodes x 8 H200: data 8 x FSDP 8 across nodes, experts within a node",
        dict(data=8, fsdp=8, expert=8, tensor=1), "H200", 141, 8, 450, 50, 989),
    "gpu_pod_512_fsdp": MeshPreset(
        "64 nodes x 8 H200: FSDP 64 across nodes, experts within a node (ZeRO-3-like)",
        dict(data=1, fsdp=64, expert=8, tensor=1), "H200", 141, 8, 450, 50, 989),
    "tpu_v5p_128": MeshPreset(
        "TPU v5p-128 slice (64 chips): FSDP 8 x expert 8 over ICI",
        dict(data=1, fsdp=8, expert=8, tensor=1), "TPU v5p", 95, 64, 600, 600, 459),
}


def make_preset_mesh(name: str):
  """The jax Mesh of a preset over the devices of this job (all hosts)."""
  if name not in PRESETS:
    raise ValueError(f"unknown mesh preset {name!r}; available: {sorted(PRESETS)}")
  preset = PRESETS[name]
  if preset.n_devices != jax.device_count():
    raise ValueError(f"mesh preset {name!r} needs {preset.n_devices} devices, this job "
                     f"has {jax.device_count()} ({jax.process_count()} process(es))")
  return sharding.make_mesh(**preset.mesh)


class PlanError(ValueError):
  """The model, batch and mesh cannot work together; the message says why."""


@dataclasses.dataclass
class Plan:
  preset: str
  params_total: int
  params_active: int
  memory_gb: dict[str, float]          # per device
  comm_gb: dict[str, float]            # sent per device per step
  step_s: dict[str, float]             # rough time per step: compute at 40% MFU, comms
  tokens_per_device: int
  warnings: list[str]
  kv_cache_bytes_per_token: int = 0    # all layers, bf16 (MLA: latent + rope key)

  def table(self) -> str:
    rows = [("parameters (total / active)",
             f"{self.params_total / 1e9:.2f}B / {self.params_active / 1e9:.2f}B")]
    rows += [(f"memory: {k}", f"{v:.2f} GB") for k, v in self.memory_gb.items()]
    rows += [(f"comm per step: {k}", f"{v:.2f} GB") for k, v in self.comm_gb.items()]
    rows += [(f"time per step: {k}", f"{v * 1e3:.0f} ms") for k, v in self.step_s.items()]
    rows += [("tokens per device per step", f"{self.tokens_per_device:,}")]
    if self.kv_cache_bytes_per_token:
      rows += [("KV cache per token (bf16, all layers)",
                f"{self.kv_cache_bytes_per_token / 1024:.1f} KiB")]
    out = [f"| {self.preset} | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(out + [f"\nwarning: {w}" for w in self.warnings])


def _shard_factor(shape, logical_axes, mesh: dict[str, int], rules: dict) -> int:
  """How many ways an array is split: product over dimensions of the mesh axes its
  logical name maps to, where the dimension divides (otherwise replicated)."""
  factor = 1
  for dim, name in zip(shape, logical_axes or ()):
    axes = rules.get(name)
    axes = (axes,) if isinstance(axes, str) else axes or ()
    size = math.prod(mesh[a] for a in axes)
    if size > 1 and dim % size == 0:
      factor *= size
  return factor


def kv_cache_bytes_per_token(c: ModelConfig, nbytes: int = 2) -> int:
  """Bytes one token adds to a decoding cache, over all layers. Multi-head / GQA
  attention caches K and V (2 Nkv H); MLA caches its normed latent and the shared
  rotary key (C + Dr), e.g. 576 instead of 2 * 128 * 128 for DeepSeek-V3."""
  if c.attention == "mla":
    return c.n_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * nbytes
  return c.n_layers * 2 * c.n_kv_heads * c.resolved_head_dim * nbytes


def attention_activations_per_token(c: ModelConfig) -> int:
  """Saved activations of one attention sublayer per token (elements): residual and
  norms, then q/k/v/out (GQA) or, for MLA, the compressed query and KV latents,
  the decompressed per-head queries, keys and values, and the output."""
  d = c.d_model
  if c.attention == "mla":
    dq = c.qk_nope_head_dim + c.qk_rope_head_dim
    return (4 * d + c.q_lora_rank + c.kv_lora_rank + c.qk_rope_head_dim
            + 2 * c.n_heads * dq + 2 * c.n_heads * c.v_head_dim)
  return 4 * d + 2 * c.n_heads * c.resolved_head_dim


def _local_params(c: ModelConfig, mesh: dict[str, int]) -> tuple[float, float]:
  """Parameters held per device, and per device with the fsdp axis gathered."""
  boxed = jax.eval_shape(Transformer(c).init, jax.random.key(0),
                         jnp.zeros((1, 8), jnp.int32))["params"]
  rules = dict(sharding.LOGICAL_RULES)
  local_params = fsdp_gathered = 0.0
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
    shape, names = leaf.value.shape, leaf.names
    size = math.prod(shape)
    local_params += size / _shard_factor(shape, names, mesh, rules)
    no_fsdp = {**mesh, "fsdp": 1}
    fsdp_gathered += size / _shard_factor(shape, names, no_fsdp, rules)
  return local_params, fsdp_gathered


def plan_inference(config: ModelConfig, preset_name: str, *, batch: int, seq_len: int,
                   param_bytes: int = 2) -> dict[str, float]:
  """Per-device memory (GB) to serve `batch` sequences of up to `seq_len` tokens:
  the weights (laid out like training) and the KV cache (rows split over the
  data-like axes). Raises PlanError when it does not fit."""
  if preset_name not in PRESETS:
    raise PlanError(f"unknown mesh preset {preset_name!r}; available: {sorted(PRESETS)}")
  preset = PRESETS[preset_name]
  mesh = preset.mesh
  ways = mesh["data"] * mesh["fsdp"] * mesh["expert"]
  local, _ = _local_params(config, mesh)
  memory = {"weights": local * param_bytes / GB,
            "KV cache": math.ceil(batch / ways) * seq_len
                        * kv_cache_bytes_per_token(config) / GB}
  memory["total"] = sum(memory.values())
  if memory["total"] > preset.device_memory_gb:
    raise PlanError(f"{memory['total']:.1f} GB per device needed (weights "
                    f"{memory['weights']:.1f}, KV cache {memory['KV cache']:.1f}) but a "
                    f"{preset.device} has {preset.device_memory_gb:.0f} GB")
  return memory


def plan(config: ModelConfig, preset_name: str, *, batch_tokens: int, seq_len: int,
         param_bytes: int = 4, act_bytes: int = 2) -> Plan:
  if preset_name not in PRESETS:
    raise PlanError(f"unknown mesh preset {preset_name!r}; available: {sorted(PRESETS)}")
  preset = PRESETS[preset_name]
  mesh = preset.mesh
  c = config
  ep, tp = mesh["expert"], mesh["tensor"]
  batch_ways = mesh["data"] * mesh["fsdp"] * mesh["expert"]
  rows = batch_tokens // seq_len
  if c.n_experts % ep:
    raise PlanError(f"n_experts={c.n_experts} is not divisible by the expert axis ({ep}) "
                    f"of {preset_name}")
  if rows < batch_ways or rows % batch_ways:
    raise PlanError(f"a batch of {rows} sequences cannot be split over the "
                    f"{batch_ways} data-parallel ways (data x fsdp x expert) of "
                    f"{preset_name}: use a multiple of {batch_ways}")
  tokens = batch_tokens // batch_ways                               # per device

  local_params, fsdp_gathered = _local_params(c, mesh)
  counts = count_params(c)

  # Saved activations per token per layer (bf16, no rematerialisation): residual,
  # norms, q/k/v/out, attention output; per routed slot the expert's input and
  # two hidden halves; router scores (float32).
  d, f, k = c.d_model, c.d_expert, c.top_k
  attn = attention_activations_per_token(c)
  moe = k * (d + 3 * f) + c.n_shared_experts * 3 * f + 2 * c.n_experts
  dense = 3 * c.d_ff
  per_token = (c.n_layers * attn + c.n_moe_layers * moe + c.n_dense_layers * dense) \
      * act_bytes + 2 * c.vocab_size / tp * 4                        # + logits (f32)
  memory = {"parameters": local_params * param_bytes / GB,
            "AdamW state": 2 * local_params * 4 / GB,
            "gradients": local_params * 4 / GB,
            "activations": tokens * per_token / GB}
  memory["total"] = sum(memory.values())

  fsdp, data = mesh["fsdp"], mesh["data"]
  comm = {
      # FSDP: all-gather forward and backward, reduce-scatter the gradients.
      "fsdp all-gather + reduce-scatter":
          3 * (fsdp - 1) / fsdp * fsdp_gathered * param_bytes / GB if fsdp > 1 else 0.0,
      "data all-reduce": 2 * (data - 1) / data * local_params * 4 / GB if data > 1 else 0.0,
      # The padded exchange sends min(cf, ep) * T * k rows (buffers of
      # ceil(cf * T * k / ep) per destination), out and back, forward and backward.
      "expert all-to-all": (4 * c.n_moe_layers * min(c.ep_capacity_factor, ep) * tokens
                            * k * d * act_bytes * (ep - 1) / ep / GB) if ep > 1 else 0.0,
      "tensor all-reduce": (4 * c.n_layers * 2 * (tp - 1) / tp * tokens * d * act_bytes
                            / GB) if tp > 1 else 0.0,
  }
  comm = {k: v for k, v in comm.items() if v}
  inside = min(ep * tp, preset.devices_per_node) == ep * tp
  intra = preset.intra_node_gbs or 1.0
  inter = preset.inter_node_gbs or 1.0
  step = {"compute (40% MFU)": 6 * counts.active * tokens / (0.4 * preset.peak_tflops * 1e12)}
  for name, gb in comm.items():
    across = name.startswith(("fsdp", "data")) or (not inside and name.startswith("expert"))
    step[name] = gb / (inter if across and preset.n_devices > preset.devices_per_node
                       else intra)
  warnings = []
  if memory["total"] > preset.device_memory_gb:
    raise PlanError(
        f"{memory['total']:.1f} GB per device needed ({', '.join(f'{k} {v:.1f}' for k, v in memory.items() if k != 'total')}) "
        f"but a {preset.device} has {preset.device_memory_gb:.0f} GB: shard more (a larger "
        f"fsdp/expert axis), shorten the batch, or rematerialise activations")
  if memory["total"] > 0.8 * preset.device_memory_gb:
    warnings.append(f"{memory['total']:.0f} GB of {preset.device_memory_gb:.0f} GB: under "
                    "20% headroom for XLA's temporaries")
  return Plan(preset=preset_name, params_total=counts.total, params_active=counts.active,
              memory_gb=memory, comm_gb=comm, step_s=step, tokens_per_device=tokens,
              warnings=warnings, kv_cache_bytes_per_token=kv_cache_bytes_per_token(c))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="seed_24l", help="a ModelConfig preset")
  p.add_argument("--mesh", default="gpu_pod_64", choices=sorted(PRESETS))
  p.add_argument("--batch-tokens", type=int, default=1 << 20,
                 help="global batch in tokens (the source: 1M)")
  p.add_argument("--seq-len", type=int, default=4096)
  p.add_argument("--list", action="store_true", help="list the mesh presets")
  p.add_argument("--hf-config", help="plan a Hugging Face checkpoint from its config.json "
                 "(instead of --model; moe_jax.hf.archs)")
  p.add_argument("--inference", action="store_true",
                 help="serving memory (bf16 weights + KV cache) instead of training")
  p.add_argument("--batch", type=int, default=1, help="--inference: concurrent sequences")
  args = p.parse_args(argv)
  if args.list:
    for name, preset in PRESETS.items():
      print(f"{name:<18} {preset.n_devices:>4} devices  {preset.mesh}  {preset.description}")
    return 0
  config = get_config(args.model)
  if args.hf_config:
    import json  # pylint: disable=g-import-not-at-top
    from moe_jax.hf.archs import to_model_config  # pylint: disable=g-import-not-at-top
    with open(args.hf_config) as f:
      config = to_model_config(json.load(f))
    args.model = args.hf_config
  if args.inference:
    try:
      memory = plan_inference(config, args.mesh, batch=args.batch,
                              seq_len=args.seq_len)
    except PlanError as e:
      print(f"cannot serve {args.model} on {args.mesh}: {e}")
      return 1
    print(f"| {args.mesh}: serve {args.batch} x {args.seq_len} tokens | per device |\n"
          "|---|---|\n" + "\n".join(f"| {k} | {v:.2f} GB |" for k, v in memory.items()))
    return 0
  try:
    print(plan(config, args.mesh, batch_tokens=args.batch_tokens,
               seq_len=args.seq_len).table())
  except PlanError as e:
    print(f"cannot plan {args.model} on {args.mesh}: {e}")
    return 1
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
