"""The adaptive_compute experiment end to end, shrunk (tiny model, few steps, three
variants): table, FLOP-matched interpolation, effective-k breakdowns, plot."""
import pytest
import json

import numpy as np

from experiments import adaptive_compute, run

TINY = ["model.d_model=32", "model.d_expert=32", "model.n_layers=2", "model.n_heads=2",
        "model.n_kv_heads=2", "model.max_seq_len=32", "data.seq_len=32",
        "data.batch_tokens=256", "data.max_bytes_per_domain=100000", "train.steps=4",
        "train.warmup_steps=1", "train.log_every=2", "train.eval_batches=1"]


@pytest.mark.slow
def test_adaptive_compute_end_to_end(tmp_path, monkeypatch):
  monkeypatch.setattr(adaptive_compute, "VARIANTS", [
      ("top-1", dict(top_k=1), {}),
      ("top-2", dict(top_k=2), {}),
      ("top-p 0.5", dict(routing="topp", top_p=0.5, top_k=2),
       dict(entropy_loss_alpha=0.1))])
  monkeypatch.setattr(adaptive_compute, "QUICK", ("top-1", "top-2", "top-p 0.5"))
  assert run.main(["--exp=adaptive_compute", "--quick", "--no-progress",
                   f"--workdir={tmp_path}"] + TINY) == 0
  record = json.loads((tmp_path / "results.json").read_text())
  table = {t["variant"]: t for t in record["table"]}
  assert list(table) == ["top-1", "top-2", "top-p 0.5"]
  assert table["top-1"]["k"] == 1.0 and table["top-2"]["k"] == 2.0
  topp = table["top-p 0.5"]
  assert 1.0 <= topp["k"] <= 2.0
  # FLOP-matched: the top-k losses interpolated linearly at the top-p row's k.
  lo, hi = table["top-1"]["val_loss"], table["top-2"]["val_loss"]
  np.testing.assert_allclose(topp["matched_topk_loss"], lo + (topp["k"] - 1.0) * (hi - lo),
                             rtol=1e-6)
  np.testing.assert_allclose(topp["delta_vs_matched"],
                             topp["val_loss"] - topp["matched_topk_loss"], rtol=1e-6)
  runs = {r["variant"]: r for r in record["runs"]}
  assert len(runs["top-p 0.5"]["k_by_entropy"]) == 4
  assert len(runs["top-p 0.5"]["k_by_layer"]) == 2                     # tiny: 2 MoE layers
  # The held-out k per domain averages (equal token counts) to the overall k.
  domain_k = [v for key, v in runs["top-p 0.5"].items() if key.endswith("_k")
              and key != "effective_k"]
  np.testing.assert_allclose(np.mean(domain_k), runs["top-p 0.5"]["effective_k"], rtol=1e-5)
  assert "Huang et al." in record["text"]
  assert (tmp_path / "adaptive_compute.png").stat().st_size > 1000
