"""The adaptive_compute experiment end to end, shrunk (tiny model, few steps): the
--quick rows, FLOP-matched interpolation, effective-k breakdowns, the columns the
claims audit reads, plot; and the second seed compiles nothing."""
import json

import jax
import numpy as np
import pytest

from experiments import adaptive_compute, claims, run

TINY = ["model.d_model=32", "model.d_expert=32", "model.n_layers=2", "model.n_heads=2",
        "model.n_kv_heads=2", "model.max_seq_len=32", "data.seq_len=32",
        "data.batch_tokens=256", "data.max_bytes_per_domain=100000", "train.steps=4",
        "train.warmup_steps=1", "train.log_every=2", "train.eval_batches=1"]

# XLA compilations in this process, in order (the listener stays for the session).
_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _COMPILES.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)


@pytest.mark.slow
def test_adaptive_compute_end_to_end(tmp_path, monkeypatch):
  # Compiles seen after each run's held-out routing statistics (one call per run).
  after_run = []
  stats = adaptive_compute.held_out_routing
  def counted(*args, **kwargs):
    out = stats(*args, **kwargs)
    after_run.append(len(_COMPILES))
    return out
  monkeypatch.setattr(adaptive_compute, "held_out_routing", counted)
  assert run.main(["--exp=adaptive_compute", "--quick", "--seeds=2", "--no-progress",
                   f"--workdir={tmp_path}"] + TINY) == 0
  record = json.loads((tmp_path / "results.json").read_text())
  quick = list(adaptive_compute.QUICK)
  table = {t["variant"]: t for t in record["table"]}
  assert list(table) == quick and all(t["seeds"] == 2 for t in table.values())
  assert sorted((r["variant"], r["seed"]) for r in record["runs"]) == sorted(
      (v, s) for v in quick for s in (0, 1))
  # Seeds share every compile: train and eval steps, init, the held-out forward.
  n = len(quick)
  assert len(after_run) == 2 * n and after_run[2 * n - 1] == after_run[n - 1]

  fixed = sorted((t for t in table.values() if not t["variant"].startswith("top-p")),
                 key=lambda t: t["k"])
  assert [t["k"] for t in fixed] == [float(t["variant"][len("top-"):]) for t in fixed]
  (lo, hi), topp = fixed, table["top-p 0.2"]
  assert lo["k"] <= topp["k"] <= adaptive_compute.K_MAX
  # FLOP-matched: the top-k losses interpolated linearly at the top-p row's k.
  slope = (hi["val_loss"] - lo["val_loss"]) / (hi["k"] - lo["k"])
  np.testing.assert_allclose(topp["matched_topk_loss"],
                             lo["val_loss"] + (topp["k"] - lo["k"]) * slope, rtol=1e-6)
  np.testing.assert_allclose(topp["delta_vs_matched"],
                             topp["val_loss"] - topp["matched_topk_loss"], rtol=1e-6)
  runs = [r for r in record["runs"] if r["variant"] == "top-p 0.2"]
  for r in runs:
    assert len(r["k_by_entropy"]) == 4 and len(r["k_by_layer"]) == 2   # 2 MoE layers
    assert 1.0 <= min(r["k_by_layer"]) <= max(r["k_by_layer"]) <= adaptive_compute.K_MAX
    # The held-out k per domain averages (equal token counts) to the overall k.
    domain_k = [v for key, v in r.items() if key.endswith("_k") and key != "effective_k"]
    assert len(domain_k) == 3
    np.testing.assert_allclose(np.mean(domain_k), r["effective_k"], rtol=1e-5)
  np.testing.assert_allclose(topp["k"], np.mean([r["effective_k"] for r in runs]),
                             rtol=1e-6)
  # The claims audit reads k_entropy_corr of "top-p 0.2" per seed: n = 2 here.
  spec = next(c for c in claims.load_claims()[0] if c["id"] == "adaptive_compute")
  m = claims.measure(record, spec)
  assert m["n"] == 2 and m["from"] == "runs"
  np.testing.assert_allclose(sorted(m["per_seed"]),
                             sorted(r["k_entropy_corr"] for r in runs), rtol=1e-6)
  assert "Huang et al." in record["text"]
  assert (tmp_path / "adaptive_compute.png").stat().st_size > 1000


def test_token_statistics_by_hand():
  """Quartiles, per-layer means and the correlation on a hand-made example: k rises
  with the entropy in layer 0 and is flat in layer 1."""
  k = np.array([[1, 1, 2, 2, 3, 3, 4, 4], [2, 2, 2, 2, 2, 2, 2, 2]], float)  # (L, N)
  h = np.arange(8, dtype=float)                                              # (N,)
  out = adaptive_compute.token_statistics(k, h)
  assert out["k_by_layer"] == [2.5, 2.0]
  assert out["effective_k"] == 2.25
  # Per token k over layers: 1.5 1.5 2 2 2.5 2.5 3 3; quartiles hold 2 tokens each.
  assert out["k_by_entropy"] == [1.5, 2.0, 2.5, 3.0]
  np.testing.assert_allclose(out["k_entropy_corr"], np.corrcoef(k.mean(0), h)[0, 1])
  assert out["k_entropy_corr"] > 0.9
  flat = adaptive_compute.token_statistics(np.full((2, 8), 2.0), h)
  assert flat["k_entropy_corr"] == 0.0 and flat["k_by_entropy"] == [2.0] * 4
