"""Serving engine: KV-cache decoding equals full recomputation, insert isolation, one
trace per bucket, sampling, the quantized engine, continuous == one at a time."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.config import get_config
from moe_jax.models.transformer import Transformer
from moe_jax.quant import QuantConfig, inference, quantize_params
from moe_jax.serve import kv_cache
from moe_jax.serve.engine import Engine
from moe_jax.serve.sampling import SamplingConfig, SlotSampling, sample
from moe_jax.serve.scheduler import Request, Scheduler

# init_std 0.5: a random model whose greedy tokens vary (at 0.02 it repeats a token).
TINY = get_config("tiny", init_std=0.5)
PROMPTS = [[5, 17, 230, 9, 44], [3, 3, 101], [7] * 11 + [200]]


def init(cfg, seed=0):
  return nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(seed),
                                                      jnp.zeros((1, 8), jnp.int32)))


def recompute_greedy(apply, prompt, n_new, length=32):
  """The reference: one full forward per new token over a fixed (1, length) buffer
  (causal, so the zeros after the sequence do not matter; one compilation)."""
  tokens = np.zeros((1, length), np.int32)
  tokens[0, :len(prompt)] = prompt
  for i in range(len(prompt), len(prompt) + n_new):
    tokens[0, i] = int(jnp.argmax(apply(jnp.asarray(tokens))[0, i - 1]))
  return [int(t) for t in tokens[0, len(prompt):len(prompt) + n_new]]


@pytest.mark.parametrize("overrides", [
    {},                                                       # groups, shared, dense, GQA
    {"sharing": "cycle", "n_layers": 4, "n_kv_heads": 1,      # shared sets, MQA,
     "n_dense_layers": 0, "router_bias": True},               # all MoE, router bias
    {"n_kv_heads": 4, "attention": "mla", "q_lora_rank": 24,   # MLA: the engine caches
     "kv_lora_rank": 16, "qk_nope_head_dim": 8,                # the latent + rope key
     "qk_rope_head_dim": 8, "v_head_dim": 12},
], ids=["tiny", "cycle_mqa_bias", "mla"])
def test_cached_greedy_equals_recomputation(overrides):
  cfg = TINY.replace(**overrides)
  variables = init(cfg)
  engine = Engine(cfg, batch=len(PROMPTS), buckets=(16, 32))
  if cfg.attention == "mla":   # the engine's cache holds latents, not full K/V
    assert set(engine_cache_entry(cfg)) == {"c_kv", "k_rope"}
  n_new = 12
  cached = engine.greedy(variables, PROMPTS, n_new)
  apply = jax.jit(lambda t: Transformer(cfg).apply(variables, t)[0])
  for prompt, out in zip(PROMPTS, cached):
    assert out == recompute_greedy(apply, prompt, n_new)
  assert len({t for out in cached for t in out}) > 3        # not a degenerate repeat


def engine_cache_entry(cfg):
  return kv_cache.init_cache(cfg, 1, 8)["layer_0"]


def test_prefill_logits_match_uncached_forward():
  variables = init(TINY)
  tokens = jnp.array([[5, 17, 230, 9, 44, 1, 2, 3]])
  positions = jnp.arange(8)[None]
  plain, _ = Transformer(TINY).apply(variables, tokens)
  cached, aux = Transformer(TINY).apply(variables, tokens, positions,
                                        cache=kv_cache.init_cache(TINY, 1, 16))
  chex.assert_trees_all_close(cached, plain, atol=1e-5, rtol=1e-5)
  assert set(aux["cache"]) == {f"layer_{i}" for i in range(TINY.n_layers)}
  assert aux["cache"]["layer_0"]["k"].shape == (1, 16, TINY.n_kv_heads, TINY.resolved_head_dim)


ENGINE = Engine(TINY, batch=3, buckets=(16, 32))


@functools.cache
def _vars():
  """Built on first use, not at collection (every xdist worker collects every file)."""
  return init(TINY)


def test_insert_leaves_other_slots_untouched():
  state = ENGINE.init_decode_state()
  for slot, prompt in enumerate(PROMPTS):
    state = ENGINE.insert(ENGINE.prefill(_vars(), [prompt], [SamplingConfig()]), state, [slot])
  before = jax.device_get(state)
  state = ENGINE.insert(ENGINE.prefill(_vars(), [[9, 9, 9, 9]], [SamplingConfig(seed=3)]),
                        state, [1])
  after = jax.device_get(state)
  for name in before.cache:
    for kv in ("k", "v"):
      for slot in (0, 2):
        np.testing.assert_array_equal(after.cache[name][kv][slot],
                                      before.cache[name][kv][slot])
      # slot 1: its first 4 positions are the new prompt's; past the prefill bucket
      # the old request's entries stay (masked, never read).
      assert not np.array_equal(after.cache[name][kv][1, :4], before.cache[name][kv][1, :4])
      np.testing.assert_array_equal(after.cache[name][kv][1, 16:],
                                    before.cache[name][kv][1, 16:])
  assert list(after.positions) == [5, 4, 12]


def test_generate_traces_once_per_bucket_and_batch(monkeypatch):
  monkeypatch.setattr(Engine, "_generate_fn", chex.assert_max_traces(
      Engine._generate_fn, n=2))
  engine = Engine(TINY, batch=2, buckets=(16, 32))
  state = engine.init_decode_state()
  for _ in range(3):
    for kv_len in (16, 32):
      state, _ = engine.generate(_vars(), state, kv_len)
  with pytest.raises(AssertionError, match="traced > 2"):
    Engine(TINY, batch=3, buckets=(16, 32)).generate(_vars(), ENGINE.init_decode_state(), 16)


def test_sampling_rules_by_hand():
  # probabilities 0.4, 0.3, 0.2, 0.1 at temperature 1
  logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]] * 400))
  positions = jnp.zeros(400, jnp.int32)

  def draw(**kw):
    cfgs = [SamplingConfig(seed=s, **kw) for s in range(400)]
    return np.asarray(sample(logits, SlotSampling.stack(cfgs), positions))
  assert set(draw(temperature=0.0)) == {0}
  assert set(draw(temperature=1.0, top_k=1)) == {0}
  assert set(draw(temperature=1.0, top_k=2)) == {0, 1}
  # top-p 0.5: the mass before tokens 0, 1, 2 is 0, 0.4, 0.7 -> tokens 0 and 1 kept
  assert set(draw(temperature=1.0, top_p=0.5)) == {0, 1}
  assert set(draw(temperature=1.0, top_p=0.4)) == {0}
  assert set(draw(temperature=1.0)) == {0, 1, 2, 3}
  counts = np.bincount(draw(temperature=1.0), minlength=4) / 400
  np.testing.assert_allclose(counts, [0.4, 0.3, 0.2, 0.1], atol=0.08)
  # the draw depends on (seed, position) only, not on the row
  one = sample(logits[:1], SlotSampling.stack([SamplingConfig(1.0, seed=7)]), positions[:1])
  many = draw(temperature=1.0)
  assert int(one[0]) == many[7]


def test_bad_sampling_settings_are_named():
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    SamplingConfig(temperature=-1.0)


def _requests():
  rng = np.random.default_rng(0)
  return [Request(prompt=[int(t) for t in rng.integers(0, 256, int(rng.integers(2, 14)))],
                  max_new_tokens=int(rng.integers(1, 10)), id=i,
                  sampling=SamplingConfig(temperature=[0.0, 1.0, 0.7][i % 3],
                                          top_k=[0, 5][i % 2], top_p=0.9, seed=i))
          for i in range(7)]


def test_continuous_batching_equals_one_at_a_time():
  # One bucket: every request attends over the same cache length in both runs. (The
  # static and class policies prefill several rows at once, a matmul of another shape
  # whose last bits can differ on XLA:CPU, so only continuous batching is exact.)
  engine = Engine(TINY, batch=3, buckets=(32,))
  alone = {r.id: r.output for req in _requests()
           for r in Scheduler(engine, _vars()).run([req])}
  sched = Scheduler(engine, _vars(), policy="continuous")
  batched = sched.run(_requests())
  assert {r.id: r.output for r in batched} == alone
  assert {len(o) for o in alone.values()} != {1}
  assert sched.stats["steps"] < sum(len(o) - 1 for o in alone.values())  # shared steps


@pytest.mark.parametrize("qcfg", [QuantConfig(scheme="all_high"), pytest.param(
    QuantConfig(), marks=pytest.mark.slow)], ids=["int8", "mixed_8_4"])
def test_quantized_engine_matches_quantized_forward(qcfg):
  qparams = quantize_params(_vars()["params"], qcfg)
  cached = ENGINE.greedy({"params": qparams}, PROMPTS, 8)
  apply = jax.jit(lambda t: inference.forward(qparams, t, TINY, integer=False))
  for prompt, out in zip(PROMPTS, cached):
    assert out == recompute_greedy(apply, prompt, 8)
  # the reference is not the float model: quantization changed the logits
  tokens = jnp.array([PROMPTS[0]])
  assert not np.allclose(apply(tokens), jax.jit(Transformer(TINY).apply)(_vars(), tokens)[0],
                         atol=1e-4)


def test_bfloat16_engine_decodes():
  cfg = TINY.replace(dtype="bfloat16", param_dtype="bfloat16")
  variables = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _vars())
  out = Engine(cfg, batch=1, buckets=(32,)).greedy(variables, PROMPTS[:1], 6)
  assert len(out[0]) == 6 and all(0 <= t < cfg.vocab_size for t in out[0])


def test_whole_graph_greedy_decode_equals_recomputation():
  from moe_jax.serve.engine import greedy_decode
  prompt = jnp.array([[5, 17, 230, 9], [3, 3, 101, 7]], jnp.int32)
  out = np.asarray(greedy_decode(_vars(), prompt, cfg=TINY, n_new=10))
  apply = jax.jit(lambda t: Transformer(TINY).apply(_vars(), t)[0])
  for row in range(2):
    assert list(out[row, 4:]) == recompute_greedy(apply, list(np.asarray(prompt[row])), 10)
  assert list(out[:, :4].ravel()) == list(np.asarray(prompt).ravel())


def test_scheduler_runs_compile_nothing_after_warm_up(monkeypatch):
  # Every policy, arrivals of 1..3 at a step, two prompt buckets: after warm_up the
  # scheduler only reuses compiled programs (one prefill / insert per (rows, bucket),
  # one generate per kv bucket), and a step batches its admissions per bucket.
  from moe_jax.serve import bench
  for name, n in (("_prefill_fn", 2 * 2), ("_insert_fn", 2 * 2), ("_generate_fn", 2)):
    monkeypatch.setattr(Engine, name, chex.assert_max_traces(getattr(Engine, name), n=n))
  engine = Engine(TINY, batch=2, max_len=32, buckets=(16, 32))
  bench.warm_up(engine, _vars(), engine.batch)
  for policy in ("static", "continuous", "classes"):
    sched = Scheduler(engine, _vars(), policy=policy)
    done = sched.run(_requests())
    assert sorted(r.id for r in done) == list(range(7))
    assert sched.stats["prefills"] < 7          # admissions of a step share a prefill
