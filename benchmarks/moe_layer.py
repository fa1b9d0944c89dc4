"""MoE block speed per dispatch strategy against the dense limit, cost growth, EP.

    python benchmarks/moe_layer.py            # ~1.5 min on 2 idle CPU cores
    python benchmarks/moe_layer.py --quick    # one shape, 1,024 tokens

For each shape, forward+backward of the routed experts (router included) per
strategy, against a dense SwiGLU whose hidden width is k * d_expert: the same active
FLOPs per token, the limit a perfect dispatch would reach. `vs_dense_limit` =
dense-limit time / strategy time (1.0 = no dispatch overhead). So that a slow
baseline cannot flatter the ratio, the dense limit's own GFLOP/s is reported next to
a large matmul's rate measured in the same process (`dense_limit_vs_matmul`). And so
that the dispatch is not blamed for what the matmuls cost, "experts alone
(balanced)" times the routed experts' own batched matmuls at a perfect balance, no
router and no dispatch: the best any per-expert dispatch can do on this machine.

All timings in one process, interleaved round by round (each round runs every entry
once), best round per entry: background load hits every entry alike.

`cost_growth`: the dropless block at top-4, d_expert 128, d_model 256, 4,096 tokens,
with 8 and with 128 experts; the ratio of step times (target <= 1.3: dispatch should
cost O(tokens * k), not O(tokens * experts)), and the same ratio for the experts
alone (what the narrower per-expert matmuls cost by themselves).

`scaling`: the expert-parallel block with experts over 1, 2, 4, 8 simulated CPU
devices (they share the same cores: this shows the exchange's overhead, not a
speed-up). Prints one JSON object.
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
from moe_jax.models import dispatch as dp  # noqa: E402
from moe_jax.models.layers import swiglu  # noqa: E402
from moe_jax.models.moe import MoEBlock  # noqa: E402
from moe_jax.models.router import route_tokens  # noqa: E402

SHAPES = [  # (name, n_experts, top_k, d_model, d_expert)
    ("8 experts top-2", 8, 2, 256, 512),
    ("64 experts top-4", 64, 4, 256, 128),
    ("64 experts top-8", 64, 8, 256, 64),
]
STRATEGIES = [("dropless (tiled)", dict(dispatch="dropless", dropless_impl="tiled")),
              ("dropless (ragged_dot)", dict(dispatch="dropless", dropless_impl="ragged")),
              ("capacity 1.25", dict(dispatch="capacity", capacity_factor=1.25)),
              ("dense reference", dict(dispatch="dense"))]
# ragged_dot and the dense reference cost E times the FLOPs on a CPU: skip them
# where that would take minutes.
SLOW_ON_CPU = ("dropless (ragged_dot)", "dense reference")


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
  """Best time of each `fn(*args)` over `rounds` rounds, every entry once per round."""
  for fn, args in fns.values():
    jax.block_until_ready(fn(*args))
  best = {name: float("inf") for name in fns}
  for _ in range(rounds):
    for name, (fn, args) in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      best[name] = min(best[name], time.perf_counter() - t)
  return best


def moe_fwd_bwd(cfg, x):
  params = nn.meta.unbox(MoEBlock(cfg).init(jax.random.key(1), x))

  def loss(p, x):
    y, _ = MoEBlock(cfg).apply(p, x)
    return jnp.sum(y * y)

  return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)


def dense_fwd_bwd(d, hidden, x, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(2), 3)
  w = tuple((jax.random.normal(kk, s) * 0.02).astype(dtype) for kk, s in
            zip(keys, [(d, hidden), (d, hidden), (hidden, d)]))
  loss = lambda w, x: jnp.sum(swiglu(x, *w).astype(jnp.float32) ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1))), (w, x.astype(dtype))


def experts_alone_fwd_bwd(e: int, k: int, d: int, f: int, tokens: int, dtype=jnp.float32):
  """The routed experts' own matmuls at a perfect balance: (E, T*k/E, D) rows against
  the (E, D, F) weights, no router, no dispatch. No dispatch built on per-expert
  matmuls can beat it, so it separates the dispatch's overhead from the cost of
  splitting one wide matmul into E narrow ones on this machine."""
  keys = jax.random.split(jax.random.key(3), 4)
  rows = jax.random.normal(keys[0], (e, tokens * k // e, d), dtype)
  w = tuple((jax.random.normal(kk, s) * 0.02).astype(dtype) for kk, s in
            zip(keys[1:], [(e, d, f), (e, d, f), (e, f, d)]))
  loss = lambda w, x: jnp.sum(dp.expert_ffn(x, w).astype(jnp.float32) ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1))), (w, rows)


def matmul_fn(n: int, dtype=jnp.float32):
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  return jax.jit(lambda a: a @ a), (a,)


def swiglu_flops(tokens: int, d: int, hidden: int) -> float:
  """Forward + backward: 3 matmuls of 2*T*D*H each, backward twice the forward."""
  return 3 * 3 * 2 * tokens * d * hidden


def run(tokens: int = 4096, rounds: int = 5, quick: bool = False, ragged: bool | None = None,
        scaling: bool = True, growth: bool = True, dtype: str = "float32") -> dict:
  """The whole benchmark as a dict; `ragged` None: only where it is fast (not CPU)."""
  cpu = jax.default_backend() == "cpu"
  ragged = (not cpu) if ragged is None else ragged
  out = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
         "tokens": tokens, "dtype": dtype, "rounds": rounds, "shapes": []}
  for name, e, k, d, f in SHAPES[:1] if quick else SHAPES:
    x = jax.random.normal(jax.random.key(0), (tokens // 128, 128, d), jnp.dtype(dtype))
    base = get_config("small", d_model=d, d_expert=f, n_experts=e, top_k=k, n_groups=1,
                      topk_groups=1, dtype=dtype)
    fns = {"dense limit": dense_fwd_bwd(d, k * f, x.reshape(-1, d), jnp.dtype(dtype)),
           "experts alone (balanced)": experts_alone_fwd_bwd(e, k, d, f, tokens,
                                                             jnp.dtype(dtype)),
           "matmul": matmul_fn(2048 if cpu else 8192, jnp.dtype(dtype))}
    for label, kw in STRATEGIES:
      if label in SLOW_ON_CPU and not ragged:
        continue
      fns[label] = moe_fwd_bwd(base.replace(**kw), x)
    times = interleaved(fns, rounds)
    n = fns["matmul"][1][0].shape[0]
    matmul_gflops = 2 * n ** 3 / times.pop("matmul") / 1e9
    dense_gflops = swiglu_flops(tokens, d, k * f) / times["dense limit"] / 1e9
    out["shapes"].append({
        "shape": name, "n_experts": e, "top_k": k, "d_model": d, "d_expert": f,
        "matmul_gflops": matmul_gflops, "dense_limit_gflops": dense_gflops,
        "dense_limit_vs_matmul": dense_gflops / matmul_gflops,
        **{label: {"ms": 1e3 * t, "tokens_per_s": tokens / t,
                   "vs_dense_limit": times["dense limit"] / t}
           for label, t in times.items()}})

  if growth and not quick:
    x = jax.random.normal(jax.random.key(0), (tokens // 128, 128, 256), jnp.dtype(dtype))
    fns = {f"{e} experts": moe_fwd_bwd(get_config(
        "small", d_model=256, d_expert=128, n_experts=e, top_k=4, n_groups=1,
        topk_groups=1, dtype=dtype), x) for e in (8, 128)}
    fns.update({f"{e} experts alone (balanced)": experts_alone_fwd_bwd(
        e, 4, 256, 128, tokens, jnp.dtype(dtype)) for e in (8, 128)})
    times = interleaved(fns, rounds)
    alone = lambda e: times[f"{e} experts alone (balanced)"]
    out["cost_growth"] = {**{label: 1e3 * t for label, t in times.items()},
                          "ratio_128_vs_8": times["128 experts"] / times["8 experts"],
                          "experts_alone_ratio_128_vs_8": alone(128) / alone(8)}

  if scaling:
    name, e, k, d, f = SHAPES[0]
    cfg = get_config("small", d_model=d, d_expert=f, n_experts=e, top_k=k, n_groups=1,
                     topk_groups=1, ep_capacity_factor=2.0, dtype=dtype)
    x = jax.random.normal(jax.random.key(0), (8 * max(1, tokens // 1024), 128, d))
    out["scaling"], single = [], None
    for n in (1, 2, 4, 8):
      if n > jax.device_count():
        break
      fn, fargs = moe_fwd_bwd(cfg, x)
      with jax.set_mesh(sharding.make_mesh(expert=n, devices=jax.devices()[:n])):
        t = interleaved({"ep": (fn, fargs)}, rounds)["ep"]
      single = single or t
      out["scaling"].append({"expert_devices": n, "ms": 1e3 * t, "vs_1_device": single / t})
  return out


def _fwd_bwd(f, *args):
  """Forward+backward of f on its float arguments, against a random cotangent passed
  in as an argument: a constant one would let XLA fold the backward's matmuls into
  reductions, so the phase would time less work than it does inside the block."""
  outs = jax.tree.leaves(jax.eval_shape(f, *args))
  g = [jax.random.normal(jax.random.key(i), o.shape, jnp.float32) for i, o in enumerate(outs)]

  def loss(*a):
    *a, g = a
    return sum(jnp.vdot(o.astype(jnp.float32), c) for o, c in zip(jax.tree.leaves(f(*a)), g))

  floats = tuple(i for i, a in enumerate(args) if jnp.issubdtype(
      getattr(a, "dtype", jnp.int32), jnp.floating))
  return jax.jit(jax.grad(loss, argnums=floats)), (*args, g)


def profile(tokens: int = 4096, rounds: int = 5, dtype: str = "float32") -> dict:
  """Per phase of the tiled dropless path, forward+backward, side by side with the
  whole block and the dense limit: ms and fraction of the whole block's step."""
  out = {"tokens": tokens, "rounds": rounds, "shapes": []}
  for name, e, k, d, f in SHAPES:
    cfg = get_config("small", d_model=d, d_expert=f, n_experts=e, top_k=k, n_groups=1,
                     topk_groups=1, dtype=dtype)
    x3 = jax.random.normal(jax.random.key(0), (tokens // 128, 128, d), jnp.dtype(dtype))
    x = x3.reshape(-1, d)
    step, (params, _) = moe_fwd_bwd(cfg, x3)
    p = params["params"]
    w = tuple(p[n] for n in ("w_gate", "w_up", "w_down"))
    kernel = p["router"]["kernel"]
    r = jax.jit(lambda x, kr: route_tokens(x, kr, None, cfg))(x, kernel)
    s = jax.jit(lambda r: dp.sort_assignments(r.experts, r.active, e))(r)
    cap, block, n_tiles = dp.dropless_layout(r.experts.size, cfg, False)
    perm, over = dp.dropless_permutation(r, s, cfg, False)
    n_in = e * cap
    x_rows = dp.permute(x, perm)
    rows_in = x_rows[:n_in].reshape(e, cap, d)
    rows_over = x_rows[n_in:].reshape(n_tiles, block, d)
    y_rows = jnp.zeros_like(x_rows)
    fns = {
        "whole block": (step, (params, x3)),
        "dense limit": dense_fwd_bwd(d, k * f, x, jnp.dtype(dtype)),
        "router": _fwd_bwd(lambda x, kr: route_tokens(x, kr, None, cfg).weights, x, kernel),
        "sort_assignments": (jax.jit(lambda ex, ac: dp.sort_assignments(ex, ac, e)),
                             (r.experts, r.active)),
        "permutation (index maps)": (jax.jit(lambda r, s: dp.dropless_permutation(
            r, s, cfg, False)[0]), (r, s)),
        "permute": _fwd_bwd(dp.permute, x, perm),
        "in-place experts": _fwd_bwd(lambda rows, c, *w: dp.inplace_experts(
            rows, c, dp.swiglu_experts(w), dp._n_chunks(cap, False)), rows_in, s.counts, *w),
        "overflow tiles": _fwd_bwd(lambda rows, o, *w: dp.tiled_experts(
            rows, o, dp.swiglu_experts(w), max(1, e // 4)), rows_over, over, *w),
        "unpermute": _fwd_bwd(dp.unpermute, y_rows, perm, r.weights),
    }
    times = interleaved(fns, rounds)
    whole = times["whole block"]
    phases = {n: {"ms": 1e3 * t, "of_block": t / whole} for n, t in times.items()}
    out["shapes"].append({
        "shape": name, "capacity": cap, "overflow_tiles": n_tiles,
        "overflow_tiles_used": int(over.n_used), "max_load": int(s.counts.max()),
        "vs_dense_limit": times["dense limit"] / whole,
        "sum_of_phases_of_block": sum(
            v["of_block"] for n, v in phases.items() if n not in ("whole block", "dense limit")),
        "phases": phases})
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--ragged", action="store_true",
                 help="also time ragged_dot and the dense reference on a CPU")
  p.add_argument("--no-scaling", action="store_true")
  p.add_argument("--profile", action="store_true",
                 help="time each phase of the dropless path instead")
  args = p.parse_args()
  if args.profile:
    print(json.dumps(profile(args.tokens, args.rounds), indent=1))
    return
  out = run(1024 if args.quick else args.tokens, args.rounds, args.quick,
            True if args.ragged else None, scaling=not args.no_scaling)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
