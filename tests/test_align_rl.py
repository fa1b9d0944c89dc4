"""PPO / GRPO: GAE, KL estimators and the clipped losses by hand; the sampled KV-cache
decoder against greedy decoding and the engine's slots; a short PPO run that raises a
toy reward with bounded KL; bitwise resume; GRPO's group advantages by hand."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import data as data_lib
from moe_jax.align import rl_math
from moe_jax.align.grpo import grpo_objective
from moe_jax.align.ppo import RLConfig, ppo_objective
from moe_jax.align.rollout import PromptIterator, response_mask
from moe_jax.config import TrainConfig, get_config
from moe_jax.models.transformer import Transformer
from moe_jax.serve.engine import Engine, decode, greedy_decode
from moe_jax.serve.sampling import SamplingConfig, SlotSampling
from moe_jax.train import loop

# ------------------------------------------------------------------- the math ---

def test_gae_by_hand():
  rewards = jnp.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
  values = jnp.array([[0.5, 0.2, 0.1], [0.5, 0.2, 0.7]])
  mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
  adv, ret = rl_math.gae(rewards, values, mask, gamma=0.9, lam=0.8)
  # Row 0: δ = (0.9*0.2-0.5, 0.9*0.1-0.2, 1-0.1) = (-0.32, -0.11, 0.9);
  # A2 = 0.9, A1 = -0.11 + 0.72*0.9 = 0.538, A0 = -0.32 + 0.72*0.538 = 0.06736.
  # Row 1 ends at t=1 (the value after it is 0; t=2 is masked out):
  # δ1 = 1 - 0.2 = 0.8, δ0 = 0.9*0.2 - 0.5 = -0.32 -> A = (0.256, 0.8, 0).
  np.testing.assert_allclose(adv, [[0.06736, 0.538, 0.9], [0.256, 0.8, 0.0]], atol=1e-6)
  np.testing.assert_allclose(ret, [[0.56736, 0.738, 1.0], [0.756, 1.0, 0.0]], atol=1e-6)


def test_gae_lambda_one_is_discounted_return_minus_value():
  rng = np.random.default_rng(0)
  r, v = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
  adv, _ = rl_math.gae(jnp.array(r), jnp.array(v), jnp.ones((2, 6)), gamma=0.7, lam=1.0)
  disc = np.array([[sum(0.7 ** k * r[b, t + k] for k in range(6 - t)) for t in range(6)]
                   for b in range(2)])
  np.testing.assert_allclose(adv, disc - v, atol=1e-5)


def test_kl_estimators_formulas_and_unbiasedness():
  logp, logp_ref = jnp.array([-1.0, -2.0, -0.5]), jnp.array([-1.5, -1.0, -0.5])
  d = np.array([0.5, -1.0, 0.0])                                      # log q/p
  np.testing.assert_allclose(rl_math.kl_estimate(logp, logp_ref, "k1"), d, rtol=1e-6)
  np.testing.assert_allclose(rl_math.kl_estimate(logp, logp_ref, "k2"), 0.5 * d ** 2,
                             rtol=1e-6)
  np.testing.assert_allclose(rl_math.kl_estimate(logp, logp_ref, "k3"),
                             np.exp(-d) - 1 + d, rtol=1e-6, atol=1e-7)
  # k1 and k3 are unbiased estimates of KL(q||p) from samples of q; k3 is >= 0.
  q = jax.nn.log_softmax(jnp.array([1.0, 0.2, -0.5, 0.3]))
  p = jax.nn.log_softmax(jnp.array([0.1, 0.5, 0.0, -0.4]))
  exact = float(jnp.sum(jnp.exp(q) * (q - p)))
  x = jax.random.categorical(jax.random.PRNGKey(0), q, shape=(400_000,))
  k1 = rl_math.kl_estimate(q[x], p[x], "k1")
  k3 = rl_math.kl_estimate(q[x], p[x], "k3")
  assert abs(float(k1.mean()) - exact) < 5e-3 and abs(float(k3.mean()) - exact) < 5e-3
  assert float(k3.min()) >= 0
  with pytest.raises(ValueError, match="k4"):
    rl_math.kl_estimate(logp, logp_ref, "k4")


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_policy_loss_clipping_regions(sign):
  ratios = jnp.array([[0.5, 0.9, 1.1, 1.5]])
  logp_old = jnp.zeros((1, 4))
  adv = jnp.full((1, 4), sign)
  mask = jnp.ones((1, 4))
  loss_fn = lambda lp: rl_math.policy_loss(lp, logp_old, adv, mask, clip=0.2)[0]
  loss, frac = rl_math.policy_loss(jnp.log(ratios), logp_old, adv, mask, clip=0.2)
  grad = jax.grad(loss_fn)(jnp.log(ratios))
  # A > 0: a ratio above 1.2 gains nothing more (clipped, zero gradient); below 0.8
  # the unclipped (smaller) term applies. A < 0: mirrored.
  clipped = [False, False, False, True] if sign > 0 else [True, False, False, False]
  expect_obj = [min(r * sign, np.clip(r, 0.8, 1.2) * sign) for r in [0.5, 0.9, 1.1, 1.5]]
  np.testing.assert_allclose(loss, -np.mean(expect_obj), rtol=1e-6)
  # d(-ρA/4)/dlogp = -ρA/4 where unclipped, 0 where clipped.
  expect_grad = [0.0 if c else -r * sign / 4 for c, r in zip(clipped, [0.5, 0.9, 1.1, 1.5])]
  np.testing.assert_allclose(grad[0], expect_grad, rtol=1e-6, atol=1e-9)
  assert float(frac) == 0.25


def test_value_loss_clipping_regions():
  values = jnp.array([[0.1, 0.5, -0.5]])
  old, ret, mask = jnp.zeros((1, 3)), jnp.ones((1, 3)), jnp.ones((1, 3))
  loss_fn = lambda v: rl_math.value_loss(v, old, ret, mask, clip=0.2)
  # inside the clip range both errors agree; 0.5: the clipped error (0.2-1)² is the
  # larger -> constant, zero gradient; -0.5: the unclipped (1.5²) is the larger.
  np.testing.assert_allclose(loss_fn(values), 0.5 * (0.81 + 0.64 + 2.25) / 3, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(loss_fn)(values)[0], [-0.9 / 3, 0.0, -1.5 / 3],
                             rtol=1e-6)


def test_group_advantages_by_hand():
  r = jnp.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])                       # groups of 3
  adv = rl_math.group_advantages(r, 3, eps=0.0 + 1e-12)
  m, s = 1 / 3, np.std([1, 0, 0])
  np.testing.assert_allclose(adv[:3], [(1 - m) / s, -m / s, -m / s], rtol=1e-5)
  m, s = 5 / 3, np.std([1, 2, 2])
  np.testing.assert_allclose(adv[3:], [(1 - m) / s, (2 - m) / s, (2 - m) / s], rtol=1e-5)
  # Per principle: principle 0 varies in [0, 1], principle 1 in [0, 100]; each is
  # normalised within the group before the sum, so both weigh the same.
  r2 = jnp.array([[1.0, 0.0], [0.0, 100.0]])
  per = rl_math.group_advantages(r2, 2, eps=1e-12)
  np.testing.assert_allclose(per, [1 - 1, -1 + 1], atol=1e-5)         # (+1-1, -1+1)
  summed = rl_math.group_advantages(r2.sum(-1), 2, eps=1e-12)
  np.testing.assert_allclose(summed, [-1, 1], atol=1e-5)              # principle 1 wins
  with pytest.raises(ValueError, match="multiple of the group"):
    rl_math.group_advantages(jnp.ones(5), 2)


def test_token_rewards_and_response_mask():
  mask = response_mask(jnp.array([[5, 9, 7, 9], [1, 2, 3, 4]]), stop_token=9)
  np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 1, 1]])
  r = rl_math.token_rewards(jnp.array([2.0, 3.0]), jnp.full((2, 4), 0.5), mask, 0.2)
  np.testing.assert_allclose(r, [[-0.1, 1.9, 0, 0], [-0.1, -0.1, -0.1, 2.9]], atol=1e-6)


# -------------------------------------------------------------- the decoder ---

CFG = get_config("tiny", init_std=0.5, max_seq_len=32, n_layers=2, n_dense_layers=2)


@functools.cache
def _vars():
  """Built on first use, not at collection (every xdist worker collects every file)."""
  return nn.meta.unbox(jax.jit(Transformer(CFG).init)(jax.random.PRNGKey(0),
                                                      jnp.zeros((1, 8), jnp.int32)))


def test_decode_at_temperature_zero_is_greedy_and_traces_once():
  prompt = jnp.array([[5, 17, 230, 9], [3, 3, 101, 7]], jnp.int32)
  greedy = np.asarray(greedy_decode(_vars(), prompt, cfg=CFG, n_new=8))
  before = decode._cache_size()
  for seed in range(3):                                   # new values: no retrace
    s = SlotSampling.stack([SamplingConfig(temperature=0.0, seed=seed)] * 2)
    np.testing.assert_array_equal(decode(_vars(), prompt, cfg=CFG, n_new=8, sampling=s),
                                  greedy)
  s = SlotSampling.stack([SamplingConfig(temperature=1.0, seed=7)] * 2)
  decode(_vars(), prompt, cfg=CFG, n_new=8, sampling=s)
  assert decode._cache_size() == before + 1
  counted = jax.jit(chex.assert_max_traces(
      lambda v, p, s: decode(v, p, cfg=CFG, n_new=8, sampling=s), n=1))
  counted(_vars(), prompt, s)
  counted(_vars(), prompt + 1, SlotSampling.stack([SamplingConfig(temperature=0.7)] * 2))


def test_sampled_decode_equals_the_engine_slots():
  """Each row draws with fold_in(key, position), as the engine's slots do: the
  whole-graph decoder and the engine give the same sampled tokens."""
  prompts = [[5, 17, 230, 9], [3, 3, 101, 7]]
  configs = [SamplingConfig(temperature=1.0, seed=3), SamplingConfig(temperature=0.8,
                                                                     top_k=20, seed=11)]
  out = np.asarray(decode(_vars(), jnp.array(prompts, jnp.int32), cfg=CFG, n_new=6,
                          sampling=SlotSampling.stack(configs)))
  engine = Engine(CFG, batch=2, buckets=(16, 32))
  state = engine.init_decode_state()
  for i, (p, c) in enumerate(zip(prompts, configs)):
    state = engine.insert(engine.prefill(_vars(), [p], [c], bucket=4), state, [i])
  rows = [[int(t)] for t in np.asarray(state.tokens)]
  for step in range(5):
    state, tokens = engine.generate(_vars(), state, engine.kv_bucket(4 + step))
    for i, t in enumerate(np.asarray(tokens)):
      rows[i].append(int(t))
  np.testing.assert_array_equal(out[:, 4:], rows)


# -------------------------------------------------------- PPO through the loop ---

P, N = 8, 8
SMALL = get_config("tiny", max_seq_len=P + N, n_layers=2, n_dense_layers=2)  # dense: fast


@functools.cache
def _small_params():
  """Built on first use, not at collection (every xdist worker collects every file)."""
  return nn.meta.unbox(jax.jit(Transformer(SMALL).init)(
      jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32)))["params"]


DATA = data_lib.DataConfig(seq_len=16, batch_tokens=64, max_bytes_per_domain=100_000)
PROMPTS = np.random.default_rng(0).integers(97, 123, (64, P)).astype(np.int32)


def toy_reward(frozen, tokens, mask):
  """Fraction of response tokens that are multiples of 4 (about 1/4 at the start)."""
  hit = (tokens[:, P:] % 4 == 0) * mask[:, P:]
  return jnp.sum(hit, 1) / jnp.maximum(jnp.sum(mask[:, P:], 1), 1.0)


def ppo_run(workdir, steps, stop_at=None, rl=None, lr=3e-2):
  rl = rl or RLConfig(response_len=N, ppo_epochs=2, kl_coef=0.05)
  tcfg = TrainConfig(steps=steps, warmup_steps=0, lr=lr, min_lr_ratio=1.0, log_every=2,
                     eval_batches=1, checkpoint_every=1000)
  frozen = ({"base": _small_params()} if rl.lora_rank else {"reference": _small_params()})
  obj = ppo_objective(SMALL, tcfg, rl, _small_params(), toy_reward, batch_size=16,
                      prompt_len=P, frozen=frozen)
  return loop.train(SMALL, DATA, tcfg, workdir, objective=obj, frozen=frozen,
                    train_iter=PromptIterator(PROMPTS, 16, seed=0), progress=False,
                    stop_at=stop_at, log=lambda _: None)


def test_ppo_raises_a_toy_reward_with_bounded_kl(tmp_path):
  res = ppo_run(tmp_path / "ppo", steps=20)
  h = res.history
  first, last = h[0]["reward"], np.mean([r["reward"] for r in h[-3:]])
  assert last > first + 0.1, [r["reward"] for r in h]                # ~0.23 -> ~0.4
  assert all(0 <= r["clip_frac"] <= 1 for r in h)
  assert max(abs(r["kl"]) for r in h) < 10.0                       # nats per response
  assert set(res.eval) == set(DATA.domains)                          # alignment tax


def test_ppo_resume_is_exact(tmp_path):
  full = ppo_run(tmp_path / "full", steps=6)
  ppo_run(tmp_path / "part", steps=6, stop_at=3)                     # mid-rollout
  resumed = ppo_run(tmp_path / "part", steps=6)
  assert resumed.resumed_from == 3
  chex.assert_trees_all_equal(full.state.params, resumed.state.params)
  chex.assert_trees_all_equal(full.state.extra, resumed.state.extra)


def test_ppo_lora_trains_adapters_only(tmp_path):
  rl = RLConfig(response_len=N, ppo_epochs=2, lora_rank=4)
  res = ppo_run(tmp_path / "lora", steps=2, rl=rl)
  assert set(res.state.params) == {"adapters", "value"}
  b = jax.tree.leaves(res.state.params["adapters"])
  assert any(float(jnp.abs(x).max()) > 0 for x in b)               # B left zero


def test_grpo_runs_through_the_loop_per_principle(tmp_path):
  def two_principles(frozen, tokens, mask):                          # (B, 2)
    return jnp.stack([toy_reward(frozen, tokens, mask),
                      100.0 * jnp.mean(tokens[:, P:] < 128, 1)], axis=1)
  rl = RLConfig(response_len=N, ppo_epochs=2, group=4, per_principle=True)
  tcfg = TrainConfig(steps=4, warmup_steps=0, lr=1e-2, log_every=2, eval_batches=1)
  frozen = {"reference": _small_params()}
  obj = grpo_objective(SMALL, tcfg, rl, _small_params(), two_principles, batch_size=4,
                       prompt_len=P, frozen=frozen)
  res = loop.train(SMALL, DATA, tcfg, tmp_path / "grpo", objective=obj, frozen=frozen,
                   train_iter=PromptIterator(PROMPTS, 4), progress=False,
                   log=lambda _: None)
  ro = res.state.extra["rollout"]
  assert ro["tokens"].shape == (16, P + N) and ro["adv"].shape == (16,)
  # Each group's advantages are a sum of 2 z-scores: zero mean within the group.
  np.testing.assert_allclose(np.asarray(ro["adv"]).reshape(4, 4).sum(1), 0, atol=1e-4)
  assert {"reward/p1", "reward/p2", "kl_loss"} <= set(res.history[-1])


def test_rl_config_errors():
  with pytest.raises(ValueError, match="kl_estimator"):
    RLConfig(kl_estimator="k9")
  with pytest.raises(ValueError, match="max_seq_len"):
    ppo_objective(SMALL, TrainConfig(), RLConfig(response_len=32), _small_params(),
                  toy_reward, batch_size=4, prompt_len=P, frozen={"reference": _small_params()})


# ------------------------------------------------------- the experiment, shrunk ---

@pytest.mark.slow
def test_alignment_experiment_end_to_end(tmp_path, monkeypatch):
  import json

  from experiments import alignment, run
  monkeypatch.setitem(alignment.SETTINGS, "quick", dict(
      base_steps=4, slcai_steps=2, rm_steps=2, rl_steps=2, chunks=1, n_train=32,
      n_heldout=16, rl_batch=8, group=4, kl_coefs=(0.0, 0.2)))
  assert run.main(["--exp=alignment", "--quick", "--no-progress", f"--workdir={tmp_path}",
                   "model.d_model=32", "model.d_expert=32", "data.batch_tokens=512",
                   "train.eval_batches=1"]) == 0
  record = json.loads((tmp_path / "results.json").read_text())
  names = [r["variant"] for r in record["table"]]
  assert names == ["base", "SL-CAI", "PPO kl=0", "PPO kl=0.2", "GRPO kl=0.2"]
  assert {f"p{i}" for i in range(1, 13)} <= set(record["table"][0])
  assert "+41%" in record["text"] and "pair accuracy" in record["text"]
  assert all((tmp_path / f"alignment_{k}.png").exists() for k in ("reward", "kl", "pass_rate"))
