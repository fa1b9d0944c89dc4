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


@pytest.mark.slow
def test_sharing_ablation_end_to_end(tmp_path, capsys):
  assert run.main(["--exp=sharing_ablation", "--quick", "--no-progress",
                   f"--workdir={tmp_path}"] + TINY) == 0
  record = json.loads((tmp_path / "results.json").read_text())
  assert [r["variant"] for r in record["table"]] == ["none", "source", "all (ALBERT)",
                                                     "cycle ABCD"]
  totals = [r["params_total"] for r in record["table"]]
  # Counted from the resolved configs (overrides applied: 2 layers, where the
  # source's scheme shares as much as "all"), not from the experiment's defaults.
  assert totals[2] <= totals[1] < totals[0]             # all <= source < none
  from moe_jax.config import ModelConfig
  from moe_jax.models.counting import count_params
  resolved = record["runs"][0]["configs"]["model"]
  assert resolved["n_layers"] == 2 and resolved["d_model"] == 32
  assert totals[0] == count_params(ModelConfig(**resolved)).total
  assert record["git"]["commit"] and record["packages"]["jax"] == jax.__version__
  assert record["runs"][0]["fingerprint"]
  md = (tmp_path / "results.md").read_text()
  assert "| variant |" in md and "Source claims" in md
  assert (tmp_path / "loss.png").stat().st_size > 1000
