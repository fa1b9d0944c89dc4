"""Distillation: each loss on hand-computed values, the layer mapping, the model's
hidden/attention outputs, the decision-tree rules in JAX, stage chaining, and a
shrunken end-to-end run of the experiment."""
import glob
import json
import math

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
from moe_jax.train.step import learning_rate


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
  weights = dict(ce=0.0, feature=1.0, attention=1.0, logit=1.0, rules=0.0)
  total, terms = distill.distill_loss(
      {"student": params}, batch, {"logits": logits, **aux}, None, weights=weights,
      temperature=2.0, student_cfg=teacher, mapping=losses.layer_map(4, 4),
      tcfg=TrainConfig())
  for k in ("feature", "attention", "logit"):
    assert float(terms[k]) == pytest.approx(0.0, abs=1e-5), k
  assert float(terms["ce"]) > 1.0                       # computed, weighted by 0
  assert float(total) == pytest.approx(float(terms["balance"]), abs=1e-4)
  # Without teacher outputs only CE is computed; the other terms are 0.
  total, terms = distill.distill_loss(
      {"student": params}, batch, None, None, weights=dict(weights, ce=1.0),
      temperature=2.0, student_cfg=teacher, mapping=losses.layer_map(4, 4),
      tcfg=TrainConfig())
  assert float(total) == pytest.approx(float(terms["ce"] + terms["balance"]), rel=1e-6)


def test_stage_table_and_index_by_hand():
  stages = [distill.StageConfig("scratch", steps=2),
            distill.StageConfig("feat", steps=3, feature=1.0),
            distill.StageConfig("attn+logit", steps=1, ce=0.5, attention=1.0, logit=0.5,
                                temperature=3.0)]
  plan = distill.stage_table(stages)
  big = 2**31 - 1
  np.testing.assert_array_equal(plan["ends"], [2, 5, 6, big])
  np.testing.assert_array_equal(plan["branch"], [0, 1, 2, 2])
  np.testing.assert_array_equal(plan["weights"][:3], [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0],
                                                      [0.5, 0, 1, 0.5, 0]])
  np.testing.assert_array_equal(plan["temperature"], [2, 2, 3, 3])
  index = [int(distill.stage_index(plan, jnp.int32(s))) for s in range(6)]
  assert index == [0, 0, 1, 1, 1, 2]
  assert distill.StageConfig("r", steps=1, rules=1.0).branch == 1
  assert distill.StageConfig("fa", steps=1, feature=1.0, attention=1.0).branch == 2
  assert distill.StageConfig("l", steps=1, logit=1.0).branch == 1
  with pytest.raises(ValueError, match="1 to 4 stages"):
    distill.stage_table(stages * 2)
  # Every row of a (student, teacher) pair shares one loss function (one compile).
  teacher_cfg, student_cfg = _tiny_pair()
  init = distill.init_student(student_cfg, 16)
  objectives = [distill.distill_objective(init, rows, student_cfg=student_cfg,
                                          teacher_cfg=teacher_cfg, tcfg=TrainConfig())
                for rows in (stages, stages[:1])]
  assert objectives[0].loss is objectives[1].loss
  assert objectives[0].config != objectives[1].config        # a resume tells them apart


def _stage_kwargs(teacher_layers: int = 4):
  teacher_cfg, student_cfg = _tiny_pair()
  teacher_cfg = teacher_cfg.replace(n_layers=teacher_layers)     # fewer: a faster compile
  dcfg = data_lib.DataConfig(seq_len=16, batch_tokens=64, max_bytes_per_domain=50_000)
  teacher = {"params": distill.init_student(teacher_cfg, 16, seed=1)}
  return dict(student_cfg=student_cfg, teacher_variables=teacher, teacher_cfg=teacher_cfg,
              dcfg=dcfg, tcfg=TrainConfig(lr=1e-2, warmup_steps=2, log_every=1,
                                          checkpoint_every=2, eval_batches=1))


def test_one_schedule_and_one_optimizer_across_stages(tmp_path):
  """Two stages with equal weights == one stage of the same steps, bit for bit: the
  lr does not restart its warm-up at the switch, Adam's moments are not reset. A
  row whose stages differ sees the same lr at every step and switches the terms."""
  kw = _stage_kwargs(teacher_layers=2)
  init = distill.init_student(kw["student_cfg"], 16, seed=2)
  one = distill.run_stages(init, [distill.StageConfig("a", steps=4, logit=0.5)],
                           workdir=tmp_path / "one", **kw)
  two = distill.run_stages(init, [distill.StageConfig("a", steps=2, logit=0.5),
                                  distill.StageConfig("b", steps=2, logit=0.5)],
                           workdir=tmp_path / "two", **kw)
  chex.assert_trees_all_equal(two.state.params, one.state.params)
  chex.assert_trees_all_equal(two.state.opt_state, one.state.opt_state)
  assert [h["stage"] for h in two.history] == [0, 0, 1, 1]
  schedule = learning_rate(kw["tcfg"].replace(steps=4))
  np.testing.assert_allclose([h["lr"] for h in one.history],
                             [float(schedule(s)) for s in range(4)], rtol=1e-6)
  assert one.history[1]["lr"] == pytest.approx(5e-3)              # warm-up over 2 steps
  mixed = distill.run_stages(init, [distill.StageConfig("feat", steps=1, feature=1.0),
                                    distill.StageConfig("attn", steps=2, attention=1.0),
                                    distill.StageConfig("ce", steps=1)],
                             workdir=tmp_path / "mixed", **kw)
  assert [h["lr"] for h in mixed.history] == [h["lr"] for h in one.history]
  assert [h["stage"] for h in mixed.history] == [0, 1, 1, 2]
  nonzero = [{k for k in distill.TERMS if h[k] != 0} for h in mixed.history]
  # Stage 1 (features; the teacher's logits are there, so the logit KD is computed
  # and weighted 0), stage 2 (attention: + attention KL, and the feature term
  # weighted 0), stage 3 (CE only: no teacher forward).
  assert nonzero == [{"ce", "feature", "logit"}, {"ce", "feature", "attention", "logit"},
                     {"ce", "feature", "attention", "logit"}, {"ce"}]
  assert int(mixed.state.step) == 4 and "proj" in mixed.state.params
  assert mixed.data_state["next_row"] == one.data_state["next_row"]   # one data stream
  with pytest.raises(ValueError, match="RuleTree"):
    distill.run_stages(init, [distill.StageConfig("r", steps=1, rules=1.0)],
                       workdir=tmp_path / "r", **kw)


@pytest.mark.slow
def test_a_row_resumes_exactly_and_the_teacher_is_not_checkpointed(tmp_path):
  """Through the one loop: a 2-stage row stopped mid-way (in its second stage) and
  resumed equals an uninterrupted one, the projection W included; the teacher is a
  frozen input."""
  kw = _stage_kwargs()
  init = distill.init_student(kw["student_cfg"], 16, seed=2)
  stages = [distill.StageConfig("features", steps=2, feature=1.0, logit=0.5),
            distill.StageConfig("logits", steps=2, ce=0.5, logit=0.5)]
  straight = distill.run_stages(init, stages, workdir=tmp_path / "a", **kw)
  distill.run_stages(init, stages, workdir=tmp_path / "b", stop_at=3,
                     **dict(kw, tcfg=kw["tcfg"].replace(checkpoint_every=3)))
  resumed = distill.run_stages(init, stages, workdir=tmp_path / "b",
                               **dict(kw, tcfg=kw["tcfg"].replace(checkpoint_every=3)))
  assert resumed.resumed_from == 3 and resumed.steps_trained == 1
  np.testing.assert_array_equal([h["loss"] for h in resumed.history],
                                [h["loss"] for h in straight.history])
  chex.assert_trees_all_equal(resumed.state.params, straight.state.params)
  assert "proj" in resumed.state.params          # widths differ: W is trained
  with Checkpointer(tmp_path / "b" / "checkpoints", save_every=2) as ckpt:
    _, meta = ckpt.read_json(4)
  sums = json.load(open(glob.glob(str(tmp_path / "b" / "checkpoints" / "4" / "checksums" /
                                      "metadata"))[0]))["state"]
  assert any("'student'" in k for k in sums) and not any("teacher" in k for k in sums)
  assert meta["identity"]["objective"]["teacher"]["n_layers"] == 4
  assert [s["name"] for s in meta["identity"]["objective"]["stages"]] == ["features",
                                                                          "logits"]


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


# ------------------------------------------------------------------ code completion

def test_completion_prompts_by_hand():
  nl, sp = 10, 32
  rows = np.array([
      # a line start at 3 (too early for a 4-token prompt), then one at 7 after two
      # spaces of indentation: prompt = row[3:7], reference = row[7:9]
      [1, 2, nl, 3, 4, nl, sp, 5, 6, 7],
      [1, nl, nl, sp, nl, 8, 9, 1, 2, 3],     # blank lines are skipped; start at 5
      [1, 2, 3, 4, 5, 6, 7, 8, 9, 1],         # no line start: no prompt
  ])
  prompts, refs = distill.completion_prompts(rows, prompt_len=4, n_new=2, max_prompts=5)
  np.testing.assert_array_equal(prompts, [[3, 4, nl, sp], [nl, nl, sp, nl]])
  np.testing.assert_array_equal(refs, [[5, 6], [8, 9]])
  one, _ = distill.completion_prompts(rows, prompt_len=4, n_new=2, max_prompts=1)
  assert len(one) == 1
  with pytest.raises(ValueError, match="no line start"):
    distill.completion_prompts(rows[2:], prompt_len=4, n_new=2, max_prompts=5)


def test_completion_scores_by_hand():
  refs = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 3], [4, 5, 6]])
  gen = np.array([[1, 2, 3], [1, 2, 0], [0, 2, 3], [4, 5, 6]])
  # exact: rows 0 and 3 -> 2/4; prefix: 3, 2, 0, 3 matched leading tokens -> 8/12
  scores = distill.completion_scores(gen, refs)
  assert scores == pytest.approx({"exact": 0.5, "prefix": 8 / 12})
  with pytest.raises(ValueError, match="same shape"):
    distill.completion_scores(gen[:, :2], refs)


def test_code_completion_scores_the_models_greedy_tokens():
  """The KV-cache completions (serving engine) are the cache-free greedy decode's;
  a reference equal to them scores 100%, one differing at the last token 0 / 2/3."""
  cfg = _tiny_pair()[1]
  variables = {"params": distill.init_student(cfg, 16, seed=4)}
  prompts = np.asarray(jax.random.randint(jax.random.key(5), (4, 6), 0, 200), np.int32)
  greedy = np.asarray(distill.greedy_decode(variables, jnp.asarray(prompts), cfg=cfg,
                                            n_new=3))[:, 6:]                 # (4, 3)
  assert distill.code_completion(variables, cfg, prompts, greedy, batch=2) == \
      {"exact": 1.0, "prefix": 1.0}
  wrong = greedy.copy()
  wrong[:, 2] = (wrong[:, 2] + 1) % cfg.vocab_size
  assert distill.code_completion(variables, cfg, prompts, wrong, batch=2) == \
      pytest.approx({"exact": 0.0, "prefix": 2 / 3})


# ------------------------------------------------------------------ experiment

def _fake_run(variant, seed, accs, val_loss, params, moe=False, exact=10.0):
  row = {"variant": variant, "seed": seed, "moe": moe, "val_loss": val_loss,
         "val_acc": float(np.mean(accs)), "params_total": params,
         "completion_exact_%": exact, "completion_prefix_%": 2 * exact,
         "curves": {"step": [1, 2], "loss": [3.0, 2.0]}}
  for domain, acc in zip(("code", "prose", "math"), accs):
    row[f"{domain}_acc"], row[f"{domain}_loss"] = acc, val_loss
  return row


def test_distill_summary_by_hand(tmp_path):
  """Per-seed quality against the teacher, mean ± sd cells and the text, from
  hand-made runs: a student at 0.9x / 0.8x the teacher's accuracy in seeds 0 / 1
  keeps 85.0 ± 7.1%; 0.5 nats worse keeps 100 exp(-0.5) = 60.7%."""
  import types
  from experiments import distill_stages as ds
  t_acc = (0.40, 0.30, 0.50)                   # teacher mean 0.4
  rows = []
  for seed, f in ((0, 0.9), (1, 0.8)):
    rows += [_fake_run(ds.SCRATCH, seed, (0.30, 0.30, 0.30), 2.1, 100),
             _fake_run(ds.LOGITS_ONLY, seed, (0.32, 0.32, 0.32), 2.0, 100),
             _fake_run(ds.FULL, seed, tuple(f * a for a in t_acc), 2.5, 100),
             _fake_run(ds.NO_RULES, seed, t_acc, 2.0, 100),
             _fake_run(ds.MOE_FULL, seed, t_acc, 2.0, 300, moe=True),
             _fake_run(ds.MOE_SCRATCH, seed, t_acc, 2.0, 300, moe=True)]
  rows += [_fake_run("teacher", s, t_acc, 2.0, 1000, exact=20.0) for s in (0, 1)]
  rule_info = dict(examples=["r"], rule_leaves=3, confident_rules=2, tree_fidelity=0.5,
                   rule_coverage=0.25, rule_fidelity=0.75)
  speed = {"teacher_tok_s": 100.0, "student_tok_s": 300.0, "student_moe_tok_s": 200.0,
           "speedup": 3.0, "speedup_moe": 2.0}
  train, data = TrainConfig(steps=80, lr=3e-3), data_lib.DataConfig(batch_tokens=8192)
  out = ds.summarise(rows, types.SimpleNamespace(workdir=tmp_path), speed, rule_info,
                     "t/ckpt", (train, data), ds.student_train(train, data))
  by = {r["variant"]: r for r in out["table"]}
  assert by[ds.FULL]["quality_acc_%"] == "85.0 ± 7.1"
  assert by[ds.FULL]["quality_ppl_%"] == f"{100 * math.exp(-0.5):.1f} ± 0.0"
  assert by[ds.SCRATCH]["quality_acc_%"] == "75.0 ± 0.0"
  assert by[ds.FULL]["speedup"] == 3.0 and by[ds.MOE_FULL]["speedup"] == 2.0
  assert by["teacher"]["speedup"] == 1.0 and by["teacher"]["seeds"] == 2
  per_seed = [r["quality_acc_%"] for r in rows if r["variant"] == ds.FULL]
  assert per_seed == pytest.approx([90.0, 80.0])
  assert ("1+2+3 keeps 85.0 ± 7.1% (accuracy) / 60.7 ± 0.0% (perplexity) with 0.10x "
          "the parameters, at 3.0x the generation speed") in out["text"]
  assert "beats the student trained from scratch by 0.1000 ± 0.0000" in out["text"]
  # 1/5 of the steps at half the batch: 10x fewer tokens.
  assert "Every student row: 16 steps of 4,096 tokens (10.0x fewer" in out["text"]
  assert "MoE student (0.30x the parameters, 2.0x the speed)" in out["text"]


@pytest.mark.slow
def test_distill_stages_end_to_end(tmp_path):
  pytest.importorskip("sklearn")
  from experiments import run
  from tests.test_runner import TINY
  assert run.main(["--exp=distill_stages", "--quick", "--no-progress",
                   f"--workdir={tmp_path}"] + TINY) == 0
  record = json.loads((tmp_path / "results.json").read_text())
  variants = [r["variant"] for r in record["table"]]
  assert variants == ["scratch (CE only)", "logits only", "1+2+3 progressive",
                      "1+2+3 without rules", "MoE student 1+2+3", "MoE student scratch",
                      "teacher"]
  runs = record["runs"]
  teacher = next(r for r in runs if r["variant"] == "teacher")
  # Quality recomputed from each run's own per-domain accuracies against the
  # teacher's; every student row trained 3 steps (1/5 of 4, at least one per stage)
  # of half the teacher's batch.
  mean_acc = lambda r: np.mean([r[f"{d}_acc"] for d in ("code", "prose", "math")])
  for r in runs:
    if r["variant"] != "teacher":
      assert r["quality_acc_%"] == pytest.approx(100 * mean_acc(r) / mean_acc(teacher))
      assert r["configs"]["train"]["steps"] == 3
      assert r["configs"]["data"]["batch_tokens"] == 128
      assert 0 <= r["completion_exact_%"] <= r["completion_prefix_%"] <= 100
  moe = next(r for r in runs if r["variant"] == "MoE student 1+2+3")
  dense = next(r for r in runs if r["variant"] == "1+2+3 progressive")
  assert moe["moe"] and not dense["moe"] and dense["params_total"] < moe["params_total"]
  assert dense["curves"]["lr"][0] == 0.0                   # one warm-up, at the start
  assert (tmp_path / "teacher" / "checkpoints").is_dir()
