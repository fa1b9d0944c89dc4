"""Distillation: each loss on hand-computed values, the layer mapping, the model's
hidden/attention outputs, the decision-tree rules in JAX, stage chaining, and a
shrunken end-to-end run of the experiment."""
import glob
import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import data as data_lib
from moe_jax import distill
from moe_jax.config import TrainConfig, get_config
from moe_jax.distill import losses
from moe_jax.models import Transformer
from moe_jax.train import Checkpointer


# ------------------------------------------------------------------ losses

def test_layer_map():
  assert losses.layer_map(2, 4) == (1, 3)
  assert losses.layer_map(3, 4) == (0, 1, 3)
  assert losses.layer_map(4, 4) == (0, 1, 2, 3)
  assert losses.layer_map(1, 6) == (5,)
  with pytest.raises(ValueError, match="student_layers=5"):
    losses.layer_map(5, 4)


def test_feature_loss_by_hand():
  student = jnp.array([1.0, 2.0]).reshape(1, 1, 1, 2)                 # (Ls, B, T, D)
  teacher = jnp.array([[0.0, 0.0], [3.0, 4.0]]).reshape(2, 1, 1, 2)   # (Lt, B, T, D)
  assert float(losses.feature_loss(student, teacher, (1,))) == pytest.approx(4.0)
  assert float(losses.feature_loss(student, teacher, (0,))) == pytest.approx(2.5)
  proj = jnp.array([[2.0, 0.0, 1.0], [0.0, 2.0, 0.0]])                # (Ds=2, Dt=3)
  teacher3 = jnp.array([2.0, 4.0, 4.0]).reshape(1, 1, 1, 3)
  # [1, 2] @ proj = [2, 4, 1] vs [2, 4, 4]: (0 + 0 + 9) / 3
  assert float(losses.feature_loss(student, teacher3, (0,), proj)) == pytest.approx(3.0)
  assert float(losses.feature_loss(teacher, teacher, (0, 1))) == 0.0
  with pytest.raises(ValueError, match="projection"):
    losses.feature_loss(student, teacher3, (0,))


def test_attention_kl_known_distributions():
  # One layer, batch, head; two query positions (row 0 can only see key 0).
  teacher = jnp.array([[1.0, 0.0], [0.5, 0.5]]).reshape(1, 1, 1, 2, 2)
  student = jnp.array([[1.0, 0.0], [0.25, 0.75]]).reshape(1, 1, 1, 2, 2)
  row1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
  assert float(losses.attention_kl(student, teacher, (0,))) == pytest.approx(row1 / 2)
  assert float(losses.attention_kl(teacher, teacher, (0,))) == pytest.approx(0.0, abs=1e-7)
  # Two teacher heads are averaged onto one student head: [1,0]+[0,1] -> [.5,.5].
  two_heads = jnp.array([[[1.0, 0.0], [1.0, 0.0]],
                         [[1.0, 0.0], [0.0, 1.0]]]).reshape(1, 1, 2, 2, 2)
  assert float(losses.attention_kl(student, two_heads, (0,))) == pytest.approx(row1 / 2)
  with pytest.raises(ValueError, match="multiple"):
    losses.group_heads(jnp.ones((1, 3, 2, 2)), 2)


def test_logit_kd_by_hand():
  teacher = jnp.zeros((1, 1, 2))                                      # uniform
  student = jnp.array([math.log(3.0), 0.0]).reshape(1, 1, 2)          # p = [.75, .25]
  kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
  assert float(losses.logit_kd(student, teacher, 1.0)) == pytest.approx(kl, rel=1e-5)
  # At tau = 2 the student needs doubled logits for the same softened p; x tau^2.
  assert float(losses.logit_kd(2 * student, teacher, 2.0)) == pytest.approx(4 * kl, rel=1e-5)
  logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
  assert float(losses.logit_kd(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_rule_loss_by_hand():
  logits = jnp.array([[[math.log(3.0), 0.0], [0.0, 0.0]]])            # (1, 2, 2)
  rule = jnp.array([[[1.0, 0.0], [1.0, 0.0]]])
  # Position 0: -log .75; position 1 (p = .5): -log .5; only position 0 is covered.
  mask = jnp.array([[1.0, 0.0]])
  assert float(losses.rule_loss(logits, rule, mask)) == pytest.approx(-math.log(0.75))
  assert float(losses.rule_loss(logits, rule, jnp.zeros((1, 2)))) == 0.0
  same = jax.nn.softmax(logits)
  assert float(losses.rule_loss(logits, same, jnp.ones((1, 2)))) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------ model outputs

def test_hidden_and_attention_outputs_leave_logits_unchanged():
  cfg = get_config("tiny", dispatch="dense", sharing="cycle")
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
  model = Transformer(cfg)
  variables = model.init(jax.random.key(1), tokens)
  logits, aux = model.apply(variables, tokens)
  logits2, aux2 = model.apply(variables, tokens, return_hidden=True, return_attention=True)
  assert "hidden" not in aux and "attention" not in aux
  chex.assert_trees_all_close(logits2, logits, atol=1e-5)
  chex.assert_trees_all_close(aux2["load"], aux["load"])
  chex.assert_shape(aux2["hidden"], (cfg.n_layers, 2, 12, cfg.d_model))
  chex.assert_shape(aux2["attention"], (cfg.n_layers, 2, cfg.n_heads, 12, 12))
  probs = aux2["attention"]
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert float(jnp.abs(jnp.triu(probs, k=1)).max()) == 0.0            # causal
  # The final norm of the last hidden state, unembedded, is the logits.
  final = model.apply(variables, aux2["hidden"][-1], method=lambda m, x: m.final_norm(x))
  chex.assert_trees_all_close(final @ variables["params"]["embed"].value.T, logits,
                              atol=1e-4)


# ------------------------------------------------------------------ rules

def test_rule_tree_in_jax_matches_sklearn():
  pytest.importorskip("sklearn")
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 20, size=(16, 12)).astype(np.int32)
  hidden = rng.normal(size=(16, 12, 8)).astype(np.float32)
  # A teacher whose greedy next token is a rule of the context: (tok + prev) % 5.
  prev = np.pad(tokens, ((0, 0), (1, 0)), constant_values=0)[:, :-1]
  logits = np.eye(24, dtype=np.float32)[(tokens + prev) % 5] * 5.0
  tree, clf = distill.fit_rules(tokens, hidden, logits, 24, domain=0, n_context=2,
                                n_components=3, min_samples_leaf=1, max_depth=12)
  probs, covered = distill.apply_rules(tree, jnp.asarray(tokens), jnp.asarray(hidden))
  x = np.asarray(distill.rules.rule_features(
      jnp.asarray(tokens), jnp.asarray(hidden), 2, tree.pca_mean, tree.pca_components))
  expected = clf.predict_proba(x.reshape(-1, x.shape[-1]))
  np.testing.assert_allclose(np.asarray(probs).reshape(-1, 24)[:, clf.classes_],
                             expected, atol=1e-6)
  info = distill.describe_rules(tree, clf, tokens, hidden, logits, decode=str)
  assert info["tree_fidelity"] > 0.9 and info["examples"]
  assert covered.dtype == jnp.bool_


# ------------------------------------------------------------------ stages

def _tiny_pair():
  teacher = get_config("tiny", n_layers=4, n_dense_layers=1, max_seq_len=16)
  student = teacher.replace(d_model=16, n_layers=2, n_heads=2, n_kv_heads=2,
                            n_dense_layers=2, d_ff=32)
  return teacher, student


def test_losses_vanish_when_student_is_teacher():
  teacher, _ = _tiny_pair()
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, teacher.vocab_size)
  params = distill.init_student(teacher, 16, seed=3)
  batch = {"inputs": tokens, "targets": tokens, "domain": jnp.zeros((2,), jnp.int32)}
  logits, aux = Transformer(teacher).apply({"params": params}, tokens,
                                           return_hidden=True, return_attention=True)
  stage = distill.StageConfig("all", steps=1, lr=1e-3, feature=1.0, attention=1.0,
                              logit=1.0)
  _, terms = distill.distill_loss(
      {"student": params}, batch, {"logits": logits, **aux}, None, stage=stage,
      student_cfg=teacher, mapping=losses.layer_map(4, 4), tcfg=TrainConfig())
  for k in ("feature", "attention", "logit"):
    assert float(terms[k]) == pytest.approx(0.0, abs=1e-5), k


def _stage_kwargs():
  teacher_cfg, student_cfg = _tiny_pair()
  dcfg = data_lib.DataConfig(seq_len=16, batch_tokens=64, max_bytes_per_domain=50_000)
  teacher = {"params": distill.init_student(teacher_cfg, 16, seed=1)}
  return dict(student_cfg=student_cfg, teacher_variables=teacher, teacher_cfg=teacher_cfg,
              dcfg=dcfg, base_tcfg=TrainConfig(log_every=1, checkpoint_every=2,
                                               eval_batches=1))


@pytest.mark.slow
def test_each_stage_starts_from_the_previous_students_parameters(tmp_path):
  kw = _stage_kwargs()
  init = distill.init_student(kw["student_cfg"], 16, seed=2)
  stages = [distill.StageConfig("features", steps=2, lr=1e-2, feature=1.0),
            distill.StageConfig("attention", steps=2, lr=1e-2, attention=1.0),
            distill.StageConfig("logits", steps=2, lr=5e-3, ce=0.5, logit=0.5)]
  results = distill.run_stages(init, stages, workdir=tmp_path, **kw)
  chex.assert_trees_all_equal(results[0].start_params, init)
  for prev, cur in zip(results, results[1:]):
    chex.assert_trees_all_equal(cur.start_params, prev.params)
    assert not jax.tree.all(jax.tree.map(np.array_equal, cur.params, cur.start_params))
    # Each stage reads on where the previous one's data stream ended.
    assert cur.run.configs["objective"]["stage"]["name"] == cur.name
  rows_read = [r.data_state["next_row"] for r in results]
  assert rows_read[0] < rows_read[1] < rows_read[2]
  assert [h["step"] for h in results[1].history] == [1, 2]
  assert {"feature", "ce"} <= set(results[0].history[0])
  assert "attention" in results[1].history[0] and "logit" in results[2].history[0]
  assert sorted(os.listdir(tmp_path)) == ["0_features", "1_attention", "2_logits"]
  with pytest.raises(ValueError, match="RuleTree"):
    distill.run_stage(init, distill.StageConfig("r", steps=1, lr=1e-3, rules=1.0),
                      workdir=tmp_path / "r", **kw)


@pytest.mark.slow
def test_a_stage_resumes_exactly_and_the_teacher_is_not_checkpointed(tmp_path):
  """Through the one loop: a stage stopped at step 2 and resumed equals an
  uninterrupted one, the projection W included; the teacher is a frozen input."""
  kw = _stage_kwargs()
  init = distill.init_student(kw["student_cfg"], 16, seed=2)
  stage = distill.StageConfig("features", steps=4, lr=1e-2, feature=1.0, logit=0.5)
  straight = distill.run_stage(init, stage, workdir=tmp_path / "a", **kw)
  distill.run_stage(init, stage, workdir=tmp_path / "b", stop_at=2, **kw)
  resumed = distill.run_stage(init, stage, workdir=tmp_path / "b", **kw)
  assert resumed.run.resumed_from == 2 and resumed.run.steps_trained == 2
  np.testing.assert_array_equal([h["loss"] for h in resumed.history],
                                [h["loss"] for h in straight.history])
  chex.assert_trees_all_equal(resumed.run.state.params, straight.run.state.params)
  assert "proj" in resumed.run.state.params          # widths differ: W is trained
  with Checkpointer(tmp_path / "b" / "checkpoints", save_every=2) as ckpt:
    _, meta = ckpt.read_json(4)
  sums = json.load(open(glob.glob(str(tmp_path / "b" / "checkpoints" / "4" / "checksums" /
                                      "metadata"))[0]))["state"]
  assert any("'student'" in k for k in sums) and not any("teacher" in k for k in sums)
  assert meta["identity"]["objective"]["teacher"]["n_layers"] == 4


def test_greedy_decode_extends_the_prompt():
  cfg = _tiny_pair()[1]
  variables = {"params": distill.init_student(cfg, 16)}
  prompt = jnp.ones((2, 4), jnp.int32)
  out = distill.greedy_decode(variables, prompt, cfg=cfg, n_new=5)
  chex.assert_shape(out, (2, 9))
  np.testing.assert_array_equal(out[:, :4], prompt)
  # Each generated token is the argmax of the model on the prefix before it.
  logits, _ = Transformer(cfg).apply(variables, out[:, :8])
  np.testing.assert_array_equal(out[:, 4:], jnp.argmax(logits[:, 3:8], -1))


# ------------------------------------------------------------------ experiment

def _fake_row(variant, accs, val_loss, params):
  row = {"variant": variant, "val_loss": val_loss, "val_acc": float(np.mean(accs)),
         "params_total": params, "curves": {"step": [1, 2], "loss": [3.0, 2.0]}}
  for domain, acc in zip(("code", "prose", "math"), accs):
    row[f"{domain}_acc"], row[f"{domain}_loss"] = acc, val_loss
  return row


def test_distill_summary_by_hand(tmp_path):
  """Quality and speed columns and the text from hand-made rows: a student at 0.9x
  the teacher's accuracy and 0.5 nats worse keeps 90.0% / 100 exp(-0.5) = 60.7%."""
  import types
  from experiments import distill_stages as ds
  rows = [_fake_row(ds.SCRATCH, (0.44, 0.33, 0.55), 1.9, 100),
          _fake_row(ds.LOGITS_ONLY, (0.32, 0.24, 0.40), 2.2, 100),
          _fake_row(ds.FULL, (0.36, 0.27, 0.45), 2.5, 100),
          _fake_row(ds.NO_RULES, (0.40, 0.30, 0.50), 2.0, 100),
          _fake_row("teacher", (0.40, 0.30, 0.50), 2.0, 1000)]
  rule_info = dict(examples=["r"], rule_leaves=3, confident_rules=2, tree_fidelity=0.5,
                   rule_coverage=0.25, rule_fidelity=0.75)
  out = ds.summarise(rows, types.SimpleNamespace(workdir=tmp_path),
                     {"teacher_tok_s": 100.0, "student_tok_s": 300.0, "speedup": 3.0,
                      "teacher_tok_s_nocache": 50.0, "student_tok_s_nocache": 100.0,
                      "speedup_nocache": 2.0},
                     rule_info, "t/ckpt", 9, data_lib.DataConfig())
  by = {r["variant"]: r for r in out["table"]}
  assert by[ds.FULL]["quality_acc_%"] == pytest.approx(90.0)
  assert by[ds.FULL]["quality_ppl_%"] == pytest.approx(100 * math.exp(-0.5))
  assert by[ds.SCRATCH]["quality_acc_%"] == pytest.approx(110.0)
  assert by[ds.SCRATCH]["quality_ppl_%"] == pytest.approx(100 * math.exp(0.1))
  assert by[ds.LOGITS_ONLY]["quality_acc_%"] == pytest.approx(80.0)
  assert by[ds.FULL]["speedup"] == 3.0 and by["teacher"]["speedup"] == 1.0
  assert ("1+2+3 keeps 90.0% (accuracy) / 60.7% (perplexity) with 0.10x the parameters, "
          "at 3.0x the generation speed") in out["text"]
  assert "From scratch: 110.0% / 110.5%; logits only: 80.0% / 81.9%" in out["text"]


@pytest.mark.slow
def test_distill_stages_end_to_end(tmp_path):
  pytest.importorskip("sklearn")
  from experiments import run
  from tests.test_runner import TINY
  assert run.main(["--exp=distill_stages", "--quick", "--no-progress",
                   f"--workdir={tmp_path}"] + TINY) == 0
  record = json.loads((tmp_path / "results.json").read_text())
  variants = [r["variant"] for r in record["table"]]
  assert variants[:3] == ["scratch (CE only)", "logits only", "1+2+3 progressive"]
  assert variants[-1] == "teacher" and len(variants) == 8
  # Quality recomputed from the table's own per-domain accuracies (student mean over
  # teacher mean), and the text reports the measured numbers of the 1+2+3 row.
  teacher = record["table"][-1]
  mean_acc = lambda r: np.mean([r[f"{d}_acc"] for d in ("code", "prose", "math")])
  for r in record["table"][:-1]:
    assert r["quality_acc_%"] == pytest.approx(100 * mean_acc(r) / mean_acc(teacher)), r
  assert record["table"][0]["params"] < teacher["params"]
  full = record["table"][2]
  assert (f"1+2+3 keeps {full['quality_acc_%']:.1f}% (accuracy) / "
          f"{full['quality_ppl_%']:.1f}% (perplexity)") in record["text"]
  assert f"at {full['speedup']:.1f}x the generation speed" in record["text"]
  assert (tmp_path / "teacher" / "checkpoints").is_dir()
