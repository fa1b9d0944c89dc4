"""The experiment runner: listing, overrides, and a shrunken end-to-end experiment."""
import json

import jax
import pytest

from experiments import common, run

TINY = ["model.d_model=32", "model.d_expert=32", "model.n_layers=2", "model.n_heads=2",
        "model.n_kv_heads=2", "model.max_seq_len=32", "data.seq_len=32",
        "data.batch_tokens=256", "data.max_bytes_per_domain=100000", "train.steps=4",
        "train.warmup_steps=1", "train.log_every=2", "train.eval_batches=1"]


def test_lists_experiments_on_unknown_name(capsys):
  assert run.main(["--exp=nope"]) == 2
  out = capsys.readouterr().out
  for name in ("balance_ablation", "sharing_ablation", "curriculum"):
    assert name in out


def test_override_parsing_and_errors():
  raw = common.parse_overrides(["model.top_k=1", "train.freeze=attn,embed"])
  assert raw["model"] == {"top_k": "1"}
  from moe_jax.config import TrainConfig, get_config
  assert common.apply_overrides(get_config("tiny"), raw["model"], "model").top_k == 1
  assert common.apply_overrides(TrainConfig(), raw["train"], "train").freeze == \
      ("attn", "embed")
  with pytest.raises(ValueError, match="section.field=value"):
    common.parse_overrides(["top_k=1"])
  with pytest.raises(ValueError, match="unknown model field"):
    common.apply_overrides(get_config("tiny"), {"topk": "1"}, "model")
  with pytest.raises(ValueError, match="ModelConfig.top_k="):
    common.apply_overrides(get_config("tiny"), {"top_k": "99"}, "model")


def test_sharing_param_matched_depth():
  """The parameter-matched unshared row of the default: the depth whose stored
  parameters are nearest the source scheme's (5 of 8 layers, within 3%)."""
  from experiments.sharing_ablation import configs, param_matched
  from moe_jax.models.counting import count_params
  model, _, _ = configs()
  source = count_params(model.replace(sharing="source")).total
  matched = param_matched(model, source)
  assert matched.sharing == "none" and matched.n_layers == 5
  assert matched.d_model == model.d_model and matched.d_expert == model.d_expert
  gap = abs(count_params(matched).total - source)
  assert gap < 0.03 * source
  for n in (4, 6):                          # the count grows with depth: neighbours
    other = model.replace(sharing="none", n_layers=n)
    assert abs(count_params(other).total - source) > gap


@pytest.mark.slow
def test_sharing_ablation_end_to_end(tmp_path, capsys):
  """Two seeds of the five rows (a 128-byte context so that held-out functions fit),
  the parameter-matched depth, and code BLEU per seed where the claims audit reads it."""
  assert run.main(["--exp=sharing_ablation", "--quick", "--no-progress", "--seeds=2",
                   f"--workdir={tmp_path}"] + TINY
                  + ["model.max_seq_len=128", "data.seq_len=128"]) == 0
  record = json.loads((tmp_path / "results.json").read_text())
  assert [r["variant"] for r in record["table"]] == [
      "none", "none (param-matched)", "source", "all (ALBERT)", "cycle ABCD"]
  t = {r["variant"]: r for r in record["table"]}
  # Counted from the resolved configs (overrides applied: 2 layers, where the
  # source's scheme shares as much as "all"), not from the experiment's defaults.
  assert t["all (ALBERT)"]["params_total"] <= t["source"]["params_total"] \
      < t["none"]["params_total"]
  from moe_jax.config import ModelConfig
  from moe_jax.models.counting import count_params
  resolved = record["runs"][0]["configs"]["model"]
  assert resolved["n_layers"] == 2 and resolved["d_model"] == 32
  assert t["none"]["params_total"] == count_params(ModelConfig(**resolved)).total
  # Parameter-matched: unshared, the depth nearest the source's stored count (the
  # 2-layer source scheme stores one layer's set: 1 layer), not overridden back to 2.
  matched = [r for r in record["runs"] if r["variant"] == "none (param-matched)"]
  assert t["none (param-matched)"]["layers"] == 1
  assert matched[0]["configs"]["model"]["sharing"] == "none"
  assert t["none (param-matched)"]["params_total"] == t["source"]["params_total"]
  runs = record["runs"]
  assert sorted((r["variant"], r["seed"]) for r in runs) == sorted(
      (v, s) for v in t for s in (0, 1))
  assert all(0.0 <= r["code_bleu"] <= 100.0 and r["code_functions"] == 8
             and r["code_new_bytes"] == 32 for r in runs)
  assert all(" ± " in r["code_bleu"] and r["seeds"] == 2 for r in record["table"])
  assert len(runs[0]["completions"]) == 8
  assert record["git"]["commit"] and record["packages"]["jax"] == jax.__version__
  assert runs[0]["fingerprint"]
  md = (tmp_path / "results.md").read_text()
  assert "| variant |" in md and "Source claims" in md and "Parameter-matched" in md
  assert (tmp_path / "loss.png").stat().st_size > 1000


@pytest.mark.slow
def test_curriculum_end_to_end(tmp_path):
  """Two seeds: a base and three stage-2 mixtures each, scored on held-out problems;
  the headline change is paired per seed."""
  assert run.main(["--exp=curriculum", "--quick", "--no-progress", "--seeds=2",
                   f"--workdir={tmp_path}"] + TINY) == 0
  record = json.loads((tmp_path / "results.json").read_text())
  names = ["stage 1 (base, 5% math)", "curriculum 5%->30%", "fixed 5%",
           "fixed 17.5% (same math tokens)"]
  assert [r["variant"] for r in record["table"]] == names
  assert all(r["seeds"] == 2 and " ± " in r["answer_token_acc"] for r in record["table"])
  runs = record["runs"]
  assert sorted((r["variant"], r["seed"]) for r in runs) == sorted(
      (v, s) for v in names for s in (0, 1))
  assert all(r["steps_trained"] == 4 and 0 <= r["answer_token_acc"] <= 1
             and r["answer_nll"] > 0 for r in runs)
  # Stage 2 of a seed starts from that seed's base: the seeds' bases differ.
  base = {r["seed"]: r["math_loss"] for r in runs if r["stage"] == 1}
  assert base[0] != base[1]
  assert "Source claim: +19%" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_data_quality_end_to_end(tmp_path):
  """Two seeds of the three training rows on junk-mixed data, the filter's per-kind
  table, and the rows the claims audit reads (paired by seed)."""
  assert run.main(["--exp=data_quality", "--quick", "--no-progress", "--seeds=2",
                   f"--workdir={tmp_path}"] + TINY) == 0
  record = json.loads((tmp_path / "results.json").read_text())
  assert [r["variant"] for r in record["table"]] == ["clean only", "junk unfiltered",
                                                     "junk entropy-filtered"]
  assert all(r["seeds"] == 2 and " ± " in r["val_loss"] for r in record["table"])
  runs = [r for r in record["runs"] if "variant" in r]
  assert sorted((r["variant"], r["seed"]) for r in runs) == sorted(
      (v, s) for v in ("clean only", "junk unfiltered", "junk entropy-filtered")
      for s in (0, 1))
  assert all(r["steps_trained"] == 4 and r["configs"]["data"]["batch_tokens"] == 256
             for r in runs)                                    # equal tokens
  share = {(r["variant"], r["seed"]): r["junk_tokens_%"] for r in runs}
  for s in (0, 1):          # the filter removes the low-entropy junk, not the rest
    assert share[("clean only", s)] == 0 < share[("junk entropy-filtered", s)] \
        < share[("junk unfiltered", s)]
  filt = {(r["threshold_bits"], r["seed"]): r for r in record["runs"]
          if r.get("part") == "filter"}
  at = filt[(3.5, 0)]
  assert at["usable_before_%"] == pytest.approx(78, abs=2)   # few documents: rounding
  assert at["char_run_recall_%"] == 100 and at["rot13_recall_%"] == 0
  assert at["precision_%"] == 100 and at["clean_lost_%"] == 0
  assert "Source claim: usable data 78% -> 92%" in record["text"]


@pytest.mark.slow
def test_qat_ablation_end_to_end(tmp_path):
  """PTQ rows with the random-channel control at equal bits, QAT rows against the
  fine-tuned control, each paired with its seed's reference."""
  assert run.main(["--exp=qat_ablation", "--quick", "--no-progress", "--seeds=1",
                   f"--workdir={tmp_path}"] + TINY) == 0
  record = json.loads((tmp_path / "results.json").read_text())
  table = {r["variant"]: r for r in record["table"]}
  assert table["mixed PTQ"]["bits/weight"] == table["mixed PTQ random channels"][
      "bits/weight"] < 8
  assert table["int3 PTQ"]["bits/weight"] == 3 and table["fp32"]["seeds"] == 1
  by = {r["variant"]: r for r in record["runs"]}
  assert by["mixed QAT random groups"]["ref"] == "fp32 fine-tuned (control)"
  assert by["mixed QAT random groups"]["configs"]["train"]["steps"] == 2    # 4 // 5 -> 2
  for name, ref in (("int4 PTQ", "fp32"), ("mixed QAT fixed groups",
                                           "fp32 fine-tuned (control)")):
    assert by[name]["loss_delta"] == pytest.approx(by[name]["val_loss"] -
                                                   by[ref]["val_loss"])
  assert "Does choosing the 8-bit channels by variance matter?" in record["text"]


@pytest.mark.slow
def test_balance_ablation_end_to_end(tmp_path, monkeypatch):
  """The quick rows at two seeds: equal tokens, the gradient-matched Switch alpha and
  the grouped routing in the resolved configs, mean ± sd cells, reductions paired per
  seed with the block's reference, one compile per row shared by the seeds, and the
  rows the claims audit reads."""
  from experiments import balance_ablation, claims
  from moe_jax.train import step
  compiles = []
  compile_once = step._compile_steps
  monkeypatch.setattr(step, "_COMPILED", type(step._COMPILED)())    # an empty cache
  monkeypatch.setattr(step, "_compile_steps",
                      lambda *a, **kw: compiles.append(1) or compile_once(*a, **kw))
  assert run.main(["--exp=balance_ablation", "--quick", "--no-progress", "--seeds=2",
                   f"--workdir={tmp_path}"] + TINY) == 0
  record = json.loads((tmp_path / "results.json").read_text())
  names = ["none", "source a=0.01", "switch a=0.32", "aux-free g=0.01",
           "groups none", "groups source a=0.01"]
  assert [r["variant"] for r in record["table"]] == names
  assert len(compiles) == len(names)                 # not once per (row, seed)
  assert all(r["seeds"] == 2 and " ± " in r["load_std"] and " ± " in r["val_loss"]
             for r in record["table"])
  runs = {(r["variant"], r["seed"]): r for r in record["runs"]}
  assert sorted(runs) == sorted((n, s) for n in names for s in (0, 1))
  assert all(r["steps_trained"] == 4 and r["configs"]["data"]["batch_tokens"] == 256
             for r in runs.values())                                # equal tokens
  train = runs[("switch a=0.32", 0)]["configs"]["train"]
  assert (train["balance_loss"], train["balance_alpha"]) == ("switch", 0.32)   # 2 E 0.01
  grouped = runs[("groups source a=0.01", 1)]["configs"]["model"]
  assert (grouped["n_experts"], grouped["n_groups"], grouped["topk_groups"],
          grouped["top_k"], grouped["d_expert"]) == (32, 4, 2, 4, 16)   # 4 x 16 = 2 x 32
  assert len(runs[("groups none", 0)]["eval_load"][0]) == 32
  assert runs[("aux-free g=0.01", 0)]["configs"]["train"]["bias_update_gamma"] == 0.01
  # Reductions are paired per seed with the block's own reference.
  table = {r["variant"]: r for r in record["table"]}
  per_seed = [100 * (1 - runs[("groups source a=0.01", s)]["load_std"]
                     / runs[("groups none", s)]["load_std"]) for s in (0, 1)]
  reduction = float(table["groups source a=0.01"]["std_reduction_%"].split(" ± ")[0])
  assert reduction == pytest.approx(sum(per_seed) / 2, abs=0.051)
  assert table["none"]["std_reduction_%"] == "0.0 ± 0.0"
  assert "Equal tokens: every row trains 4 steps of 256 tokens (1,024)" in record["text"]
  assert "gradient-matched alpha (switch a=0.32)" in record["text"]
  # Every balance_ablation claim finds its rows and columns, per seed.
  for claim in claims.load_claims()[0]:
    if claim["experiment"] == "balance_ablation":
      assert claims.measure(record, claim)["n"] == 2, claim["id"]
