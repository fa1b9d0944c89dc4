"""Quantization: quantizers by hand, grouping vs numpy, the clipped STE, int4 packing,
storage round trips, the quantized forward vs the fake-quantized one, bad settings."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.config import get_config
from moe_jax.models.transformer import Transformer
from moe_jax.quant import QuantConfig, core, inference, storage


def _params(cfg, seed=0):
  v = nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(seed),
                                                   jnp.zeros((1, 8), jnp.int32)))
  return v["params"], v.get("router_bias", {})


def _quantize_column(w, high, **kw):
  """One (R,) column through fake_quantize_matrix as a (R, 1) MLP weight."""
  qcfg = QuantConfig(scheme="all_high" if high else "all_low", **kw)
  w = jnp.asarray(w, jnp.float32)[:, None]
  return np.asarray(core.fake_quantize_matrix(w, core.Layout(0, 1), qcfg))[:, 0]


def test_symmetric_8bit_by_hand():
  # max|w| = 2.54 -> scale 0.02; w/s = -50, 0, 12.5 -> 12 (half to even), 127
  w = [-1.0, 0.0, 0.25, 2.54]
  np.testing.assert_allclose(_quantize_column(w, True), [-1.0, 0.0, 0.24, 2.54],
                             atol=1e-6)


def test_asymmetric_4bit_by_hand():
  # min -1, max 2 -> scale 3/15 = 0.2, zero = round(1/0.2) = 5;
  # q = round(w/0.2) + 5 = 0, 5, 7 (0.45/0.2 = 2.25), 15 -> w_hat = (q - 5) * 0.2
  w = [-1.0, 0.0, 0.45, 2.0]
  np.testing.assert_allclose(_quantize_column(w, False), [-1.0, 0.0, 0.4, 2.0],
                             atol=1e-6)
  qp = core.asymmetric_params(jnp.asarray(w)[:, None], 4)
  np.testing.assert_allclose([float(qp.scale[0, 0]), float(qp.zero[0, 0])], [0.2, 5.0],
                             rtol=1e-6)
  # Positive-only column: the range is extended to 0, so 0 stays exact (zero = 0).
  np.testing.assert_allclose(_quantize_column([0.5, 1.5], False), [0.5, 1.5], atol=1e-6)


def test_round_trip_error_bounded_by_half_step():
  w = jax.random.normal(jax.random.PRNGKey(0), (64, 16))
  for scheme, bits, span in (("all_high", 8, 2 * jnp.max(jnp.abs(w), 0) / 254),
                             ("all_low", 4, (jnp.max(w, 0) - jnp.min(w, 0)) / 15)):
    wq = core.fake_quantize_matrix(w, core.Layout(0, 1), QuantConfig(scheme=scheme))
    assert jnp.all(jnp.abs(wq - w) <= span / 2 + 1e-6), scheme
    assert jnp.unique(wq[:, 0]).size <= 2 ** bits


def test_grouping_matches_numpy():
  w = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4, 24, 20))) * \
      np.linspace(0.1, 2.0, 20)[np.random.default_rng(0).permutation(20)]
  qcfg = QuantConfig(quantile=0.7)
  high = np.asarray(core.channel_groups(jnp.asarray(w), qcfg))       # per (expert, column)
  n_high = 20 - round(0.7 * 20)
  assert high.sum(1).tolist() == [n_high] * 4
  for e in range(4):
    var = w[e].var(axis=0)
    assert set(np.flatnonzero(high[e])) == set(np.argsort(-var, kind="stable")[:n_high])
    assert var[high[e]].min() > np.quantile(var, 0.7) > var[~high[e]].max()
  # Expert weights are grouped per expert, columns = output channels.
  groups = core.compute_groups({"moe": {"w_up": jnp.asarray(w)}}, qcfg)
  np.testing.assert_array_equal(groups["moe/w_up"], high)


def test_random_grouping_keeps_the_count_and_bits_not_the_choice():
  # The last 6 of 20 channels have 100x the variance, so the variance rule keeps them
  # at 8 bits in every expert; the random control keeps 6 others.
  w = jax.random.normal(jax.random.PRNGKey(1), (4, 24, 20)) * \
      jnp.where(jnp.arange(20) >= 14, 10.0, 1.0)
  variance = np.asarray(core.channel_groups(w, QuantConfig()))
  assert all(set(np.flatnonzero(row)) == set(range(14, 20)) for row in variance)
  rand = lambda seed=0, name="moe/w_up": np.asarray(core.channel_groups(
      w, QuantConfig(grouping="random", grouping_seed=seed), name))
  high = rand()
  assert high.sum(1).tolist() == [6] * 4                         # the same count
  assert not (high == variance).all(axis=1).any()                # another choice
  assert len({tuple(np.flatnonzero(row)) for row in high}) > 1   # per expert
  np.testing.assert_array_equal(rand(), high)                    # deterministic
  assert (rand(seed=1) != high).any() and (rand(name="moe/w_gate") != high).any()
  # Storage draws the same channels as compute_groups (the path is the name), and
  # the bits per weight equal the variance rule's.
  qcfg = QuantConfig(grouping="random", grouping_seed=3)
  params = {"moe": {"w_up": w}}
  t = storage.quantize_params(params, qcfg)["moe"]["w_up"]
  groups = core.compute_groups(params, qcfg)["moe/w_up"]
  assert [sorted(np.asarray(row).tolist()) for row in t.high_idx] == \
      [np.flatnonzero(row).tolist() for row in np.asarray(groups)]
  assert storage.weight_bits({"w": t}) == storage.weight_bits(
      storage.quantize_params(params, QuantConfig())) == (6 * 8 + 14 * 4) / 20


def test_ste_passes_gradient_inside_clip_range_only():
  w = jnp.array([-3.0, -0.5, 0.0, 0.7, 3.0])
  scale, zero = jnp.float32(0.1), jnp.float32(0.0)
  qmin, qmax = jnp.float32(-7.0), jnp.float32(7.0)        # range [-0.7, 0.7]
  grad = jax.grad(lambda w: jnp.sum(core.fake_quant(w, scale, zero, qmin, qmax) * 2.0))(w)
  np.testing.assert_allclose(grad, [0.0, 2.0, 2.0, 2.0, 0.0])
  # Through the params transform with the default (range-covering) scales, every
  # weight is inside the range: the STE is the identity.
  p = {"mlp": {"w_up": jax.random.normal(jax.random.PRNGKey(2), (8, 6))}}
  g = jax.grad(lambda p: jnp.sum(core.fake_quantize_params(p, QuantConfig())["mlp"]["w_up"]))(p)
  np.testing.assert_allclose(g["mlp"]["w_up"], 1.0)
  g = jax.grad(lambda p: jnp.sum(core.fake_quantize_params(
      p, QuantConfig(clip_ratio=0.5))["mlp"]["w_up"]))(p)
  assert 0 < float(g["mlp"]["w_up"].sum()) < g["mlp"]["w_up"].size   # clipped ones stop


@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_int4_packing_round_trip(n):
  q = np.random.default_rng(n).integers(0, 16, (3, n, 5)).astype(np.uint8)
  packed = storage.pack_int4(q, axis=1)
  assert packed.shape == (3, (n + 1) // 2, 5) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(storage.unpack_int4(packed, n, axis=1), q)
  np.testing.assert_array_equal(storage.pack_int4(np.array([3, 10], np.uint8)), [0xA3])


@pytest.mark.parametrize("qcfg", [QuantConfig(group_size=8),
                                  QuantConfig(scheme="all_high", axis="input"),
                                  QuantConfig(scheme="all_low", low_bits=6),
                                  QuantConfig(grouping="random", grouping_seed=3)],
                         ids=lambda q: f"{q.label}-g{q.group_size}-{q.axis}")
def test_storage_dequantizes_to_the_fake_quantized_params(qcfg, tmp_path):
  params, _ = _params(get_config("tiny"))
  fake = jax.jit(lambda p: core.fake_quantize_params(p, qcfg))(params)
  qparams = storage.quantize_params(params, qcfg)
  chex.assert_trees_all_equal(jax.jit(storage.dequantize_params)(qparams), fake)
  if qcfg.group_size:                                  # orbax round trip, once
    storage.save(tmp_path / "q", qparams)
    chex.assert_trees_all_equal(storage.dequantize_params(storage.load(tmp_path / "q")),
                                fake)
  # Norms, router and embeddings stay in full precision.
  chex.assert_trees_all_equal(fake["embed"], params["embed"])
  chex.assert_trees_all_equal(fake["moe_ffn_0"]["moe"]["router"],
                              params["moe_ffn_0"]["moe"]["router"])


def test_storage_types_and_bits():
  params, _ = _params(get_config("tiny"))
  t = storage.quantize_params(params, QuantConfig())["moe_ffn_0"]["moe"]["w_up"]
  assert t.q_high.dtype == jnp.int8 and t.q_low.dtype == jnp.uint8
  assert t.q_high.shape == (8, 32, 10) and t.q_low.shape == (8, 16, 22)  # 32 - round(22.4)
  bits = storage.weight_bits(storage.quantize_params(params, QuantConfig()))
  assert 4 < bits < 8
  assert storage.weight_bits(storage.quantize_params(
      params, QuantConfig(scheme="all_low"))) == 4


def test_quantized_forward_equals_fake_quantized_forward():
  cfg = get_config("tiny", router_bias=True)
  params, bias = _params(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
  qcfg = QuantConfig(group_size=16)
  variables = {"params": core.fake_quantize_params(params, qcfg)}
  if bias:
    variables["router_bias"] = bias
  reference, _ = jax.jit(Transformer(cfg).apply)(variables, tokens)
  qparams = storage.quantize_params(params, qcfg)
  dequant = jax.jit(lambda q, t: inference.forward(q, t, cfg, bias, integer=False))(
      qparams, tokens)
  np.testing.assert_allclose(dequant, reference, atol=1e-5)
  # The integer path adds int8 activation quantization: close, not equal.
  integer = jax.jit(lambda q, t: inference.forward(q, t, cfg, bias))(qparams, tokens)
  assert float(jnp.max(jnp.abs(integer - reference))) < 0.02 * float(jnp.max(jnp.abs(reference)))


def test_int_matmul_equals_fake_quantized_matmul():
  x = jax.random.normal(jax.random.PRNGKey(3), (5, 12))
  w = jax.random.normal(jax.random.PRNGKey(4), (12, 9))
  qcfg = QuantConfig(group_size=4)
  xq, sx = inference.quantize_activations(x)
  reference = (xq.astype(jnp.float32) * sx) @ core.fake_quantize_matrix(
      w, core.Layout(0, 1), qcfg)
  y = inference.int_matmul(x[None], storage.quantize_matrix(w, core.Layout(0, 1), qcfg))
  np.testing.assert_allclose(y[0], reference, atol=1e-4)


@pytest.mark.parametrize("field, value, match", [
    ("high_bits", 9, "QuantConfig.high_bits=9"), ("low_bits", 1, "QuantConfig.low_bits=1"),
    ("quantile", 1.0, "QuantConfig.quantile=1.0"), ("quantile", 0.0, "quantile"),
    ("scheme", "int3", "QuantConfig.scheme"), ("axis", "rows", "QuantConfig.axis"),
    ("clip_ratio", 0.0, "QuantConfig.clip_ratio"), ("grouping", "size", "QuantConfig.grouping"),
    ("grouping_seed", -1, "QuantConfig.grouping_seed")])
def test_bad_settings_raise(field, value, match):
  with pytest.raises(ValueError, match=match):
    QuantConfig(**{field: value})


def test_group_size_must_divide_and_integer_path_needs_output_axis():
  w = jnp.ones((12, 4))
  with pytest.raises(ValueError, match="QuantConfig.group_size=5"):
    core.fake_quantize_matrix(w, core.Layout(0, 1), QuantConfig(group_size=5))
  t = storage.quantize_matrix(w, core.Layout(0, 1), QuantConfig(axis="input"))
  with pytest.raises(ValueError, match="axis='output'"):
    inference.int_matmul(jnp.ones((1, 2, 12)), t)


def test_qwix_int8_reference_close_to_fp32():
  pytest.importorskip("qwix")
  from moe_jax.quant import qwix_reference
  cfg = get_config("tiny")
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
  params = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), tokens)["params"])
  ref, _ = jax.jit(Transformer(cfg).apply)({"params": params}, tokens)
  forward, qparams, info = qwix_reference.qwix_ptq(cfg, params, "int8")
  out, _ = jax.jit(forward)(qparams, tokens)
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert 0.0 < rel < 0.02                     # quantized, and close
  names = set(info["quantized"])
  assert "moe_ffn_0/moe/w_gate" in names and "attn_0/attn/wq" in names
  assert "dense_ffn_0/mlp/w_up" in names and "moe_ffn_0/moe/shared_experts/w_down" in names
  assert not any("embed" == n or "router" in n or "norm" in n for n in names)
  assert info["bits_per_weight"] == 8.0


@pytest.mark.slow
def test_qat_fine_tune_resumes_exactly_through_the_loop(tmp_path):
  """QAT runs through the one training loop: the channel groups live in the state's
  `extra`, so a fine-tune stopped at step 3 and resumed equals an uninterrupted one,
  groups and regrouping statistics included."""
  from moe_jax import data as data_lib
  from moe_jax.config import TrainConfig
  from moe_jax.quant import qat
  cfg = get_config("tiny", max_seq_len=16)
  dcfg = data_lib.DataConfig(seq_len=16, batch_tokens=64, max_bytes_per_domain=50_000)
  tcfg = TrainConfig(steps=6, warmup_steps=1, lr=1e-2, log_every=1, checkpoint_every=3,
                     eval_batches=1)
  params, bias = _params(cfg)
  run = lambda workdir, **kw: qat.finetune(params, bias, cfg, dcfg, tcfg, QuantConfig(),
                                           regroup_every=2, workdir=workdir, **kw)
  p_straight, _, g_straight, straight = run(tmp_path / "a")
  run(tmp_path / "b", stop_at=3)
  p_resumed, _, g_resumed, resumed = run(tmp_path / "b")
  assert resumed.resumed_from == 3 and resumed.steps_trained == 3
  chex.assert_trees_all_equal(p_resumed, p_straight)
  chex.assert_trees_all_equal(g_resumed, g_straight)
  np.testing.assert_array_equal([h["loss"] for h in resumed.history],
                                [h["loss"] for h in straight.history])
  # Regrouped before steps 3 and 5 (every 2 steps after the first), nowhere else.
  assert [h["step"] for h in straight.history if h["regroup_count"]] == [3, 5]
  assert straight.configs["objective"]["regroup_every"] == 2
  assert not jax.tree.all(jax.tree.map(np.array_equal, p_straight, params))
