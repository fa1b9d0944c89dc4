"""MoE block speed per dispatch strategy against the dense limit, and EP scaling.

    python benchmarks/moe_layer.py            # ~3 min on 2 CPU cores
    python benchmarks/moe_layer.py --quick

For each shape, forward+backward of the routed experts (router included) per
strategy, against (a) a dense SwiGLU whose hidden width is k * d_expert, the same
active FLOPs per token: the limit a perfect dispatch would reach, and (b) the dense
reference strategy. `vs_dense_limit` = dense-limit time / strategy time (1.0 = no
dispatch overhead). All timings in one process, interleaved, best of N.

The scaling part runs the expert-parallel block with experts spread over 1, 2, 4, 8
simulated CPU devices. Simulated devices share the same cores, so on a CPU this
shows the overhead of the exchange, not a speed-up. Prints one JSON object.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moe_jax import sharding  # noqa: E402
from moe_jax.config import get_config  # noqa: E402
from moe_jax.models.layers import swiglu  # noqa: E402
from moe_jax.models.moe import MoEBlock  # noqa: E402

SHAPES = [  # (name, n_experts, top_k, d_model, d_expert)
    ("8 experts top-2", 8, 2, 256, 512),
    ("64 experts top-4", 64, 4, 256, 128),
    ("64 experts top-8", 64, 8, 256, 64),
]
STRATEGIES = [("dropless (tiled)", dict(dispatch="dropless", dropless_impl="tiled")),
              ("dropless (ragged_dot)", dict(dispatch="dropless", dropless_impl="ragged")),
              ("capacity 1.25", dict(dispatch="capacity", capacity_factor=1.25)),
              ("dense reference", dict(dispatch="dense"))]


def best_time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def moe_fwd_bwd(cfg, x):
  params = nn.meta.unbox(MoEBlock(cfg).init(jax.random.key(1), x))

  def loss(p, x):
    y, _ = MoEBlock(cfg).apply(p, x)
    return jnp.sum(y * y)

  return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)


def dense_fwd_bwd(d, hidden, x):
  keys = jax.random.split(jax.random.key(2), 3)
  w = (jax.random.normal(keys[0], (d, hidden)) * 0.02,
       jax.random.normal(keys[1], (d, hidden)) * 0.02,
       jax.random.normal(keys[2], (hidden, d)) * 0.02)
  loss = lambda w, x: jnp.sum(swiglu(x, *w) ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1))), (w, x)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--quick", action="store_true")
  args = p.parse_args()
  tokens = 1024 if args.quick else args.tokens
  out = {"backend": jax.default_backend(), "tokens": tokens, "shapes": [], "scaling": []}
  for name, e, k, d, f in SHAPES[:1] if args.quick else SHAPES:
    x = jax.random.normal(jax.random.key(0), (tokens // 128, 128, d))
    base = get_config("small", d_model=d, d_expert=f, n_experts=e, top_k=k,
                      n_groups=1, topk_groups=1, dropless_block=128)
    fns = {"dense limit": dense_fwd_bwd(d, k * f, x.reshape(-1, d))}
    for label, kw in STRATEGIES:
      fns[label] = moe_fwd_bwd(base.replace(**kw), x)
    times = {label: best_time(fn, a, args.repeats) for label, (fn, a) in fns.items()}
    out["shapes"].append({
        "shape": name, "d_model": d, "d_expert": f,
        **{label: {"ms": 1e3 * t, "tokens_per_s": tokens / t,
                   "vs_dense_limit": times["dense limit"] / t,
                   "vs_dense_reference": times["dense reference"] / t}
           for label, t in times.items()}})

  name, e, k, d, f = SHAPES[0]
  cfg = get_config("small", d_model=d, d_expert=f, n_experts=e, top_k=k, n_groups=1,
                   topk_groups=1, ep_capacity_factor=2.0)
  x = jax.random.normal(jax.random.key(0), (8 * max(1, tokens // 1024), 128, d))
  single = None
  for n in (1, 2, 4, 8):
    if n > jax.device_count():
      break
    fn, fargs = moe_fwd_bwd(cfg, x)
    mesh = sharding.make_mesh(expert=n, devices=jax.devices()[:n])
    with jax.set_mesh(mesh):
      t = best_time(fn, fargs, args.repeats)
    single = single or t
    out["scaling"].append({"expert_devices": n, "ms": 1e3 * t, "vs_1_device": single / t})
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
