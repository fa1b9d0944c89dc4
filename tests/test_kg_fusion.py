"""Knowledge-graph fusion in the Transformer, its objective and the experiment."""
import json

import chex
import flax.linen as nn
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
  p_on = jax.jit(Transformer(on).init)(jax.random.PRNGKey(1), tokens, kg=kg)["params"]
  p_off = jax.eval_shape(Transformer(off).init, jax.random.PRNGKey(1), tokens)["params"]
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
    jax.eval_shape(Transformer(off).apply, {"params": trunk}, tokens, kg=kg)


@pytest.mark.slow
def test_gradients_reach_the_gat_through_the_objective():
  from moe_jax.config import TrainConfig
  from moe_jax.train.objective import loss_fn
  cfg = _cfg(kg_fusion=True, kg_layers=(1,))
  tokens = np.asarray(_tokens())
  mentions = np.full((B, T), -1)
  mentions[:, 2] = 0
  batch = {"inputs": tokens, "targets": np.roll(tokens, -1, 1),
           "mask": np.ones((B, T), bool), **_kg(mentions)}
  params, extra = nn.meta.unbox(
      objective.kg_lm_objective(cfg, TrainConfig(), T).init(jax.random.PRNGKey(0)))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 if "value_" in jax.tree_util.keystr(path) else x, params)
  grads = jax.jit(jax.grad(lambda p: loss_fn(
      p, extra["router_bias"], batch, cfg, TrainConfig())[0]))(params)
  gat_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["kg"]["gat"]))
  assert gat_norm > 0


def test_count_params_counts_the_kg_parameters():
  from moe_jax.config import TrainConfig
  from moe_jax.models.counting import count_params
  on, off = _cfg(kg_fusion=True, kg_layers=(0, 2)), _cfg()
  params, _ = nn.meta.unbox(jax.eval_shape(                  # shapes only: no compile
      objective.kg_lm_objective(on, TrainConfig(), T).init, jax.random.PRNGKey(0)))
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  assert count_params(on).total == size(params)           # what the run trains
  assert count_params(on).total - count_params(off).total == size(params["kg"]) > 0
  assert count_params(on).active - count_params(off).active == size(params["kg"])


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
  # Matched parameters (the kg ones counted): LM-only's d_expert is rounded to the
  # nearest match, so the gap is at most half of one d_expert unit (2 layers x 2
  # experts x 3 x d_model 32); mean aggregation lacks only the attention vectors.
  assert runs[1]["params_total"] > runs[3]["params_total"]
  assert abs(runs[0]["params_total"] - runs[1]["params_total"]) <= 2 * 2 * 3 * 32 // 2
  for r in runs:
    assert 0 <= r["heldout_em"] <= 1 and 0 <= r["heldout_tok"] <= 1
    assert {"inherits_from_loss", "defined_in_loss", "appears_in_loss"} <= set(r)
    assert r["steps_trained"] == 3 and np.isfinite(r["heldout_answer_loss"])
  assert (tmp_path / "kg_fusion_loss.png").exists()
  assert "stand-in for WikiData" in record["text"] and "+8.7%" in record["text"]


# --------------------------------------------------------------------- fused batches

def _facts(feature_dim=F, seq_len=32):
  """Eight hand-made inherits_from facts over a small graph, encoded with kg arrays."""
  from moe_jax.kg import batching, cloze, graph as graph_lib, linking
  heads = [f"Cls{i}" for i in range(8)]
  g = graph_lib.from_triples([(h, "inherits_from", "Base" if i % 2 else "Root")
                              for i, h in enumerate(heads)],
                             entity_types={k: "class" for k in heads + ["Base", "Root"]})
  facts = [cloze.Fact("inherits_from", h, t, f"class {g.keys[h]} inherits from ",
                      f"{g.keys[t]}.") for h, _, t in g.triples.tolist()]
  sampler = linking.SubgraphSampler(g, max_nodes=4, max_edges=8, neighbors=2,
                                    feature_dim=feature_dim)
  return g, facts, batching.encode_facts(facts, seq_len, linking.EntityLinker(g), sampler)


def test_encoded_facts_mark_answer_and_prompt_mention_only():
  from moe_jax.kg import batching, cloze
  g, facts, rows = _facts()
  f = facts[0]                                    # "class Cls0 inherits from Root."
  assert f.sentence == "class Cls0 inherits from Root."
  answer = np.flatnonzero(rows["answer_mask"][0])
  np.testing.assert_array_equal(answer, np.arange(25, 30))      # "Root." predicted
  assert bytes(rows["targets"][0, answer].astype(np.uint8)).decode() == "Root."
  assert rows["mask"][0].sum() == len(f.sentence)
  # Only the head (prompt) is linked: its last byte "0" is input token 10 (BOS first).
  assert np.flatnonzero(rows["mentions"][0] >= 0).tolist() == [10]
  node = rows["mentions"][0, 10]
  assert rows["node_mask"][0, node] and rows["node_mask"][0].sum() == 2   # + its base
  with pytest.raises(ValueError, match="data.seq_len=16"):
    batching.encode_facts([cloze.Fact("inherits_from", 0, 1, "class Cls0 inherits from ",
                                      "Root.")], 16)


def test_fact_batches_resume_exactly():
  from moe_jax.kg import batching
  _, _, rows = _facts()
  it = batching.FactBatches(rows, 3, seed=5)                 # 2 batches per epoch
  first_epoch = np.concatenate([next(it)["inputs"] for _ in range(2)])
  # An epoch visits distinct rows; the remainder (8 % 3) is dropped.
  assert len({r.tobytes() for r in first_epoch}) == 6
  state = it.get_state()
  assert state == {"seed": 5, "epoch": 1, "batch": 0}
  ahead = [next(it)["inputs"] for _ in range(3)]
  again = batching.FactBatches(rows, 3, seed=5)
  again.set_state(state)
  for a in ahead:
    np.testing.assert_array_equal(next(again)["inputs"], a)
  other = batching.FactBatches(rows, 3, seed=6)
  assert not np.array_equal(next(other)["inputs"], first_epoch[:3])
  with pytest.raises(ValueError, match="seed 5"):
    other.set_state(state)
  with pytest.raises(ValueError, match="batch_size=9"):
    batching.FactBatches(rows, 9, seed=0)


@pytest.mark.slow
def test_kg_run_resumes_bitwise_through_the_loop(tmp_path):
  """The fused LM through moe_jax.train.loop.train: stopped at step 2 and resumed ==
  4 uninterrupted steps (params and data position); the loop's held-out evaluation
  of eval_data equals the per-token NLL of the trained model."""
  from moe_jax import data as data_lib
  from moe_jax.config import TrainConfig
  from moe_jax.kg import batching
  from moe_jax.train.loop import train
  mcfg = _cfg(kg_fusion=True, kg_layers=(0,), dispatch="dense", max_seq_len=32)
  dcfg = data_lib.DataConfig(seq_len=32, batch_tokens=32 * 3)
  tcfg = TrainConfig(steps=4, warmup_steps=1, lr=1e-2, log_every=1, checkpoint_every=2)
  g, facts, rows = _facts()
  obj = objective.kg_lm_objective(mcfg, tcfg, 32, config={"graph": g.fingerprint()})
  eval_data = {"inherits_from": batching.eval_batches(rows, 5)}   # 8 rows: 5 + 3 padded
  corpus = data_lib.corpus_from_config(dcfg)

  def run(workdir, **kw):
    return train(mcfg, dcfg, tcfg, workdir, objective=obj, progress=False, corpus=corpus,
                 train_iter=batching.FactBatches(rows, 3, seed=0), eval_data=eval_data,
                 log=lambda s: None, **kw)

  whole = run(tmp_path / "whole")
  part = run(tmp_path / "part", stop_at=2)
  assert part.steps_trained == 2
  resumed = run(tmp_path / "part")
  assert resumed.resumed_from == 2 and resumed.steps_trained == 2
  chex.assert_trees_all_equal(resumed.state.params, whole.state.params)
  assert resumed.data_state == whole.data_state == {"seed": 0, "epoch": 2, "batch": 0}
  assert set(whole.state.params["kg"]) >= {"gat", "value_0", "gate_0"}
  # The loop's evaluation == mean NLL over the real target bytes of all 8 facts.
  keys = objective.batch_keys(mcfg)
  nll, _ = objective.token_scores(whole.state.params, whole.state.extra,
                                  {k: rows[k] for k in keys}, mcfg)
  expected = float((np.asarray(nll) * rows["mask"]).sum() / rows["mask"].sum())
  np.testing.assert_allclose(whole.eval["inherits_from"]["loss"], expected, rtol=1e-5)
