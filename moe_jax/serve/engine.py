"""The decode engine, in the shape of JetStream's engine API.

    prefill(params, tokens (n, P), lengths (n,), sampling)  -> Prefix: KV (n, P), 1st token
    insert(prefix, state, slots (n,))                       -> state   (other slots untouched)
    generate(params, state, kv_len)                          -> state, tokens (B,)

`DecodeState` holds B slots: the KV cache (kv_cache.py), each slot's position and last
token, and its sampling settings. Every function is jitted once per static shape:
prefill and insert per (n, P) with P a length bucket (prompts are padded forward to
it), generate per (B, kv_len) with kv_len the smallest bucket covering every active
slot, so a batch of short requests attends over a short cache. Serving a model needs
nothing but `Transformer` (with its `cache` argument): the engine is the one decoder.

Weights: float params (fp32 or bf16, ModelConfig.dtype) or a quantized tree from
`moe_jax.quant.quantize_params` (int8 or mixed 8/4-bit QTensors), kept quantized in
memory and dequantized inside each jitted step (weight-only quantization).
"""
from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.adapt import lora as lora_lib
from moe_jax.config import ModelConfig
from moe_jax.models.transformer import Transformer
from moe_jax.quant.storage import dequantize_params, is_qtensor
from moe_jax.serve import kv_cache
from moe_jax.serve.sampling import SamplingConfig, SlotSampling, sample


@flax.struct.dataclass
class DecodeState:
  cache: dict                  # {"layer_i": {"k", "v": (B, S, Nkv, H)}}
  positions: jax.Array         # (B,) int32: position of `tokens`, the next input
  tokens: jax.Array            # (B,) int32: each slot's last sampled token
  sampling: SlotSampling       # (B,) settings


@flax.struct.dataclass
class Prefix:
  cache: dict                  # {"layer_i": {"k", "v": (n, P, Nkv, H)}}
  positions: jax.Array         # (n,) prompt lengths (= position of the first token)
  tokens: jax.Array            # (n,) the first sampled token
  sampling: SlotSampling


def length_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
  """Powers of two from `smallest` up to max_len (max_len itself always last)."""
  out, b = [], smallest
  while b < max_len:
    out.append(b)
    b *= 2
  return tuple(out) + (max_len,)


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
  for b in buckets:
    if length <= b:
      return b
  raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def has_quantized(params) -> bool:
  return any(is_qtensor(x) for x in jax.tree.leaves(params, is_leaf=is_qtensor))


@dataclasses.dataclass
class Engine:
  """config: the model; batch: slots B; max_len: context S (<= config.max_seq_len)."""
  config: ModelConfig
  batch: int = 8
  max_len: int = 0                       # 0: config.max_seq_len
  buckets: tuple[int, ...] = ()          # prefill / kv-length buckets; () powers of two
  lora: lora_lib.LoraConfig | None = None  # serve unmerged adapters (params["adapters"])

  def __post_init__(self):
    self.max_len = self.max_len or self.config.max_seq_len
    if not 1 <= self.max_len <= self.config.max_seq_len:
      raise ValueError(f"Engine.max_len={self.max_len} must be in [1, "
                       f"ModelConfig.max_seq_len={self.config.max_seq_len}]")
    if self.batch < 1:
      raise ValueError(f"Engine.batch={self.batch} must be >= 1")
    self.buckets = tuple(self.buckets) or length_buckets(self.max_len)
    if self.buckets[-1] != self.max_len or list(self.buckets) != sorted(self.buckets):
      raise ValueError(f"Engine.buckets={self.buckets} must be increasing and end at "
                       f"max_len={self.max_len}")
    self.model = Transformer(self.config)
    self._prefill = jax.jit(self._prefill_fn)
    self._insert = jax.jit(self._insert_fn, donate_argnums=1)
    self._generate = jax.jit(self._generate_fn, static_argnames="kv_len",
                             donate_argnums=1)

  # ----------------------------------------------------------------- helpers ---
  def _variables(self, params):
    """params: {"params": ..., "router_bias": ...[, "adapters": ...]} (or just the
    params tree) -> the model's variables, dequantized and adapted in the step."""
    if "params" not in params:
      params = {"params": params}
    params = dict(params)
    adapters = params.pop("adapters", None)
    if has_quantized(params["params"]):
      params["params"] = dequantize_params(params["params"],
                                           jnp.dtype(self.config.param_dtype))
    if adapters is not None:
      if self.lora is None:
        raise ValueError("params carry unmerged 'adapters' but the Engine has no "
                         "LoraConfig: pass Engine(lora=...) or merge them first")
      params["params"] = lora_lib.adapted(params["params"], adapters, self.lora)
    return params

  def init_decode_state(self) -> DecodeState:
    b = self.batch
    return DecodeState(
        cache=kv_cache.init_cache(self.config, b, self.max_len),
        positions=jnp.zeros((b,), jnp.int32), tokens=jnp.zeros((b,), jnp.int32),
        sampling=SlotSampling.stack([SamplingConfig()] * b))

  # ----------------------------------------------------------------- prefill ---
  def _prefill_fn(self, params, tokens, lengths, sampling):
    n, p = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (n, p))
    logits, aux = self.model.apply(self._variables(params), tokens, positions,
                                   cache=kv_cache.init_cache(self.config, n, p))
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    first = sample(last, sampling, lengths)                           # (n,)
    return Prefix(cache=aux["cache"], positions=lengths, tokens=first, sampling=sampling)

  def prefill(self, params, prompts: list[list[int]], sampling: list[SamplingConfig],
              bucket: int | None = None) -> Prefix:
    """Prompts (n lists of ids) padded forward to one bucket (the smallest holding
    the longest, or `bucket`) -> their caches and first tokens."""
    longest = max(len(t) for t in prompts)
    if min(len(t) for t in prompts) < 1:
      raise ValueError("every prompt needs at least one token")
    if longest >= self.max_len:
      raise ValueError(f"a prompt of {longest} tokens leaves no room to generate in a "
                       f"context of {self.max_len}")
    p = bucket or bucket_for(longest, self.buckets)
    # Rows are padded to a power of two (copies of the first prompt) so that a
    # batched prefill compiles for log2(B) row counts, not B.
    n = 1 << (len(prompts) - 1).bit_length()
    rows = list(prompts) + [prompts[0]] * (n - len(prompts))
    sampling = list(sampling) + [sampling[0]] * (n - len(prompts))
    tokens = np.zeros((n, p), np.int32)
    for i, t in enumerate(rows):
      tokens[i, :len(t)] = t
    lengths = np.array([len(t) for t in rows], np.int32)
    return self._prefill(params, jnp.asarray(tokens), jnp.asarray(lengths),
                         SlotSampling.stack(sampling))

  # ------------------------------------------------------------------ insert ---
  def _insert_fn(self, prefix: Prefix, state: DecodeState, slots):
    # slots (n,): the slot of each prefix row; B (out of range) drops the row, so one
    # compiled insert per prefix shape serves any number of kept rows.
    def put(big, small):
      return big.at[slots].set(small.astype(big.dtype), mode="drop")
    return DecodeState(cache=kv_cache.write_slots(state.cache, prefix.cache, slots),
                       positions=put(state.positions, prefix.positions),
                       tokens=put(state.tokens, prefix.tokens),
                       sampling=jax.tree.map(put, state.sampling, prefix.sampling))

  def insert(self, prefix: Prefix, state: DecodeState, slots: list[int],
             rows: list[int] | None = None) -> DecodeState:
    """Place prefilled requests (prefix rows `rows`, default the first len(slots))
    into `slots`; the other rows are dropped. `state` is donated: use the result."""
    rows = list(range(len(slots))) if rows is None else rows
    n = prefix.tokens.shape[0]
    if len(rows) != len(slots) or not set(rows) <= set(range(n)):
      raise ValueError(f"prefix rows {rows} for slots {slots}: one row in [0, {n}) "
                       f"per slot")
    if not all(0 <= s < self.batch for s in slots):
      raise ValueError(f"slots {slots} must be in [0, {self.batch})")
    where = np.full((n,), self.batch, np.int32)       # B: drop the row
    where[np.asarray(rows, np.int64)] = slots
    return self._insert(prefix, state, jnp.asarray(where))

  # ---------------------------------------------------------------- generate ---
  def _generate_fn(self, params, state: DecodeState, kv_len: int):
    part = kv_cache.take_positions(state.cache, kv_len)
    logits, aux = self.model.apply(self._variables(params), state.tokens[:, None],
                                   state.positions[:, None], cache=part)  # (B, 1, V)
    positions = state.positions + 1
    tokens = sample(logits[:, 0], state.sampling, positions)          # (B,)
    # Idle slots keep stepping (static shapes); wrap them so they stay in range.
    positions = jnp.where(positions < self.max_len, positions, 0)
    cache = kv_cache.put_positions(state.cache, aux["cache"])
    return state.replace(cache=cache, positions=positions, tokens=tokens), tokens

  def generate(self, params, state: DecodeState, kv_len: int | None = None
               ) -> tuple[DecodeState, jax.Array]:
    """One token for every slot. kv_len: a bucket > every active slot's position
    (default: max_len). `state` is donated: use the result."""
    kv_len = kv_len or self.max_len
    if kv_len not in self.buckets:
      raise ValueError(f"kv_len={kv_len} is not one of the buckets {self.buckets}")
    return self._generate(params, state, kv_len=kv_len)

  def kv_bucket(self, max_position: int) -> int:
    """The bucket a step needs when the furthest active slot feeds `max_position`."""
    return bucket_for(max_position + 1, self.buckets)

  # ------------------------------------------------------------- convenience ---
  def greedy(self, params, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    """Greedy continuation of up to `batch` prompts, n_new tokens each, all slots
    stepping together (what distillation's generation throughput times)."""
    if len(prompts) > self.batch:
      raise ValueError(f"{len(prompts)} prompts for {self.batch} slots")
    state = self.init_decode_state()
    for i, prompt in enumerate(prompts):
      state = self.insert(self.prefill(params, [prompt], [SamplingConfig()]), state, [i])
    out = [[int(t)] for t in np.asarray(state.tokens[:len(prompts)])]
    furthest = max(len(p) for p in prompts)
    for step in range(n_new - 1):
      state, tokens = self.generate(params, state, self.kv_bucket(furthest + step))
      for i, t in enumerate(np.asarray(tokens[:len(prompts)])):
        out[i].append(int(t))
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "n_new"))
def decode(variables, prompt: jax.Array, *, cfg: ModelConfig, n_new: int,
           sampling: SlotSampling | None = None) -> jax.Array:
  """prompt (B, P) int -> (B, P + n_new): the prompt and n_new tokens drawn with
  `sampling` ((B,) settings; None: greedy), with a KV cache, as one compiled program
  (a prefill, then a `fori_loop` of one-token steps). Row b draws its token at
  position t with fold_in(key_b, t) (sampling.py), as the engine's slots do. Callable
  inside a jitted function (PPO / GRPO sample their rollouts inside the train step).
  For equal-length prompts (distillation, rollouts)."""
  b, p = prompt.shape

  def draw(logits, position):                                         # (B, V), ()
    if sampling is None:
      return jnp.argmax(logits, -1).astype(prompt.dtype)
    return sample(logits, sampling, jnp.full((b,), position, jnp.int32)
                  ).astype(prompt.dtype)

  model = Transformer(cfg)
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  logits, aux = model.apply(variables, prompt, positions,
                            cache=kv_cache.init_cache(cfg, b, p + n_new))
  tokens = jnp.concatenate([prompt, jnp.zeros((b, n_new), prompt.dtype)], axis=1)
  tokens = tokens.at[:, p].set(draw(logits[:, -1], p))

  def step(i, carry):
    tokens, cache = carry
    last = jax.lax.dynamic_slice_in_dim(tokens, p + i, 1, axis=1)     # (B, 1)
    logits, aux = model.apply(variables, last, jnp.full((b, 1), p + i, jnp.int32),
                              cache=cache)
    return tokens.at[:, p + i + 1].set(draw(logits[:, 0], p + i + 1)), aux["cache"]

  tokens, _ = jax.lax.fori_loop(0, n_new - 1, step, (tokens, aux["cache"]))
  return tokens


def greedy_decode(variables, prompt: jax.Array, *, cfg: ModelConfig, n_new: int
                  ) -> jax.Array:
  """prompt (B, P) int -> (B, P + n_new) greedy: `decode` at temperature 0. The
  contract of distill/generate.py's cache-free `greedy_decode`, for equal-length
  prompts (distillation)."""
  return decode(variables, prompt, cfg=cfg, n_new=n_new)
