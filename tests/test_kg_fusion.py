"""Knowledge-graph fusion in the Transformer, its objective and the experiment."""
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.config import get_config
from moe_jax.kg import objective
from moe_jax.models.transformer import Transformer

B, T, N, E, F = 2, 16, 5, 8, 12


def _kg(mentions):
  rng = np.random.default_rng(0)
  return {"node_features": rng.normal(size=(B, N, F)).astype(np.float32),
          "node_mask": np.ones((B, N), bool),
          "edge_src": rng.integers(0, N, (B, E)).astype(np.int32),
          "edge_dst": rng.integers(0, N, (B, E)).astype(np.int32),
          "edge_rel": rng.integers(0, 4, (B, E)).astype(np.int32),
          "edge_mask": np.ones((B, E), bool), "mentions": mentions.astype(np.int32)}


def _cfg(**kw):
  return get_config("tiny", kg_features=F, kg_dim=8, kg_heads=2, kg_relations=4, **kw)


def _tokens():
  return jax.random.randint(jax.random.PRNGKey(0), (B, T), 0, 256)


def test_fusion_off_is_bit_identical_to_the_trunk():
  off, on = _cfg(), _cfg(kg_fusion=True, kg_layers=(0, 2))
  tokens = _tokens()
  mentions = np.full((B, T), -1)
  mentions[0, 3], mentions[1, 9] = 1, 4
  kg = _kg(mentions)
  p_on = Transformer(on).init(jax.random.PRNGKey(1), tokens, kg=kg)["params"]
  p_off = Transformer(off).init(jax.random.PRNGKey(1), tokens)["params"]
  # Fusion off: no kg parameters, the same tree as the plain model; on: trunk + "kg".
  assert set(p_on) - set(p_off) == {"kg"}
  trunk = {k: v for k, v in p_on.items() if k != "kg"}
  chex.assert_trees_all_equal_shapes(trunk, p_off)
  ref, _ = jax.jit(Transformer(off).apply)({"params": trunk}, tokens)
  # The value projection starts at zero, so train it a little to make fusion bite.
  p_on = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.5 if "value_" in jax.tree_util.keystr(path) else x, p_on)
  apply_on = jax.jit(lambda p, t, kg: Transformer(on).apply({"params": p}, t, kg=kg)[0])
  # With fusion on but nothing mentioned, the logits are bit-identical to fusion off.
  no_mentions = apply_on(p_on, tokens, _kg(np.full((B, T), -1)))
  np.testing.assert_array_equal(no_mentions, ref)
  # Mentions change the logits from the first mention on, never before (causal).
  fused = np.asarray(apply_on(p_on, tokens, kg))
  np.testing.assert_array_equal(fused[0, :3], ref[0, :3])
  np.testing.assert_array_equal(fused[1, :9], ref[1, :9])
  assert np.abs(fused[0, 3:] - ref[0, 3:]).max() > 1e-4
  assert np.abs(fused[1, 9:] - ref[1, 9:]).max() > 1e-4
  with pytest.raises(ValueError, match="kg_fusion=False"):
    Transformer(off).apply({"params": trunk}, tokens, kg=kg)


def test_gradients_reach_the_gat_through_the_objective():
  from moe_jax.config import TrainConfig
  cfg = _cfg(kg_fusion=True, kg_layers=(1,))
  tokens = np.asarray(_tokens())
  mentions = np.full((B, T), -1)
  mentions[:, 2] = 0
  batch = {"inputs": tokens, "targets": np.roll(tokens, -1, 1),
           "mask": np.ones((B, T), bool), **_kg(mentions)}
  params = objective.init_params(cfg, 0, batch)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 if "value_" in jax.tree_util.keystr(path) else x, params)
  grads = jax.jit(jax.grad(lambda p: objective.kg_loss_fn(
      p, {}, batch, cfg, TrainConfig())[0]))(params)
  gat_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["kg"]["gat"]))
  assert gat_norm > 0


def test_kg_config_validation():
  with pytest.raises(ValueError, match=r"ModelConfig.kg_layers=\(3,\)"):
    get_config("tiny", kg_layers=(3,))               # tiny has 3 layers: 0..2
  with pytest.raises(ValueError, match="ModelConfig.kg_dim=10"):
    get_config("tiny", kg_dim=10, kg_heads=4)
  with pytest.raises(ValueError, match="ModelConfig.kg_aggregation='max'"):
    get_config("tiny", kg_aggregation="max")
  with pytest.raises(ValueError, match="ModelConfig.kg_relations=-1"):
    get_config("tiny", kg_relations=-1)


def test_cloze_metrics_by_hand():
  correct = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], np.float32)
  answer = np.array([[0, 1, 1, 0], [0, 1, 1, 0]], bool)
  lm = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)
  nll = np.ones((2, 4), np.float32)
  m = objective.cloze_metrics(nll, correct, answer, lm)
  np.testing.assert_array_equal(m["exact"], [1, 0])
  np.testing.assert_array_equal(m["token_acc"], [1, 0.5])
  np.testing.assert_array_equal(m["tokens"], [4, 3])


TINY = ["model.d_model=32", "model.d_expert=16", "model.n_heads=2", "model.n_kv_heads=2",
        "model.max_seq_len=64", "model.kg_dim=16", "model.kg_features=32",
        "model.n_experts=2", "model.top_k=1", "data.seq_len=64",
        "data.batch_tokens=256", "train.steps=3", "train.warmup_steps=1"]


@pytest.mark.slow
def test_kg_fusion_experiment_end_to_end(tmp_path):
  from experiments import run
  assert run.main(["--exp=kg_fusion", "--quick", "--no-progress",
                   f"--workdir={tmp_path}"] + TINY) == 0
  record = json.loads((tmp_path / "results.json").read_text())
  assert [r["variant"] for r in record["table"]] == [
      "LM only", "LM+KG (GAT)", "LM+KG shuffled graph", "LM+KG mean aggregation"]
  runs = record["runs"]
  # Matched parameters: LM-only's d_expert is rounded to the nearest match, so the
  # gap is at most half of one d_expert unit (2 layers x 2 experts x 3 x d_model 32).
  assert abs(runs[0]["params"] - runs[1]["params"]) <= 2 * 2 * 3 * 32 // 2
  for r in runs:
    assert 0 <= r["heldout_em"] <= 1 and np.isfinite(r["heldout_lm_loss"])
  assert "stand-in for WikiData" in record["text"] and "+8.7%" in record["text"]
