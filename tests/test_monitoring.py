"""Monitoring: hand-computed balance and fluctuation values, thresholds, writer."""

import glob
import json
import logging
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from moe_jax.train.monitoring import (THRESHOLDS, MetricsWriter, balance_summary,
                                      check_thresholds, expert_balance, layer_balance,
                                      loss_fluctuation)


def test_expert_balance_by_hand():
  # mean 2, sum 8; relative load f/mu = [2, 1, .5, .5], whose mean is 1.
  b = expert_balance(np.array([4, 2, 1, 1]))
  assert b["load_std"] == pytest.approx(math.sqrt((1 + 0 + 0.25 + 0.25) / 4))  # sqrt(.375)
  assert b["load_cv"] == pytest.approx(b["load_std"])
  assert b["max_vio"] == pytest.approx((4 - 2) / 2)
  assert b["dead_experts"] == 0
  assert b["load_min_frac"] == pytest.approx(1 / 8)
  assert b["load_max_frac"] == pytest.approx(4 / 8)


def test_expert_balance_dead_and_perfect():
  b = expert_balance(jnp.array([0, 4, 4, 0]))  # a jax array works too
  assert b["dead_experts"] == 2
  assert b["load_std"] == pytest.approx(1.0)  # f/mu = [0, 2, 2, 0]
  assert b["max_vio"] == pytest.approx(1.0)
  perfect = expert_balance(np.full(8, 5))
  assert perfect["load_std"] == 0 and perfect["max_vio"] == 0
  assert perfect["load_min_frac"] == perfect["load_max_frac"] == pytest.approx(1 / 8)


def test_expert_balance_no_tokens_is_nan():
  b = expert_balance(np.zeros(4))
  assert math.isnan(b["load_std"]) and b["dead_experts"] == 4


def test_layer_balance():
  result = layer_balance(np.array([[4, 2, 1, 1], [0, 4, 4, 0]]))
  assert result["load_std"] == pytest.approx([math.sqrt(0.375), 1.0])
  assert result["max_vio"] == pytest.approx([1.0, 1.0])
  assert result["dead_experts"] == [0, 2]
  assert result["mean_load_std"] == pytest.approx((math.sqrt(0.375) + 1) / 2)
  assert result["mean_max_vio"] == pytest.approx(1.0)
  assert result["total_dead_experts"] == 2


def test_balance_summary():
  summary = balance_summary(np.array([[4, 2, 1, 1], [0, 4, 4, 0]]))
  assert summary["load_std"] == pytest.approx((math.sqrt(0.375) + 1) / 2)
  assert summary["load_cv"] == pytest.approx(summary["load_std"])
  assert summary["max_vio"] == pytest.approx(1.0)
  assert summary["dead_experts"] == 2
  assert summary["load_min_frac"] == 0 and summary["load_max_frac"] == pytest.approx(0.5)
  assert balance_summary(np.array([4, 2, 1, 1]))["load_std"] == pytest.approx(math.sqrt(0.375))


def test_loss_fluctuation_by_hand():
  # [1, 2, 1, 2] at t = 0..3: least-squares line 1.2 + 0.2 t = [1.2, 1.4, 1.6, 1.8],
  # residuals [-.2, .6, -.6, .2], mean square (.04 + .36 + .36 + .04) / 4 = .2.
  assert loss_fluctuation([1, 2, 1, 2], window=4) == pytest.approx(math.sqrt(0.2))
  # Only the last `window` losses count.
  assert loss_fluctuation([100.0, 1, 2, 1, 2], window=4) == pytest.approx(math.sqrt(0.2))
  # A steadily falling loss does not fluctuate.
  assert loss_fluctuation(list(np.linspace(5, 2, 60))) == pytest.approx(0, abs=1e-12)
  assert loss_fluctuation([3.0, 2.0]) == 0.0
  assert math.isnan(loss_fluctuation([3.0, float("nan"), 2.0, 1.0]))


def test_check_thresholds():
  assert THRESHOLDS == {"load_std": 0.15, "loss_fluctuation": 0.3, "p99_latency_ms": 500.0}
  messages = check_thresholds({
      "moe/layer_0/load_std": 0.2, "moe/layer_1/load_std": 0.1,
      "loss_fluctuation": float("nan"), "p99_latency_ms": 750.0,
      "train/loss": 9.0, "max_vio": 5.0})
  assert messages == [
      "moe/layer_0/load_std: 0.2 exceeds limit 0.15",
      "loss_fluctuation: value is nan (limit 0.3)",
      "p99_latency_ms: 750 exceeds limit 500",
  ]
  per_layer = layer_balance(np.array([[2, 2, 2, 2], [4, 2, 1, 1]]))
  assert check_thresholds(per_layer) == ["load_std[1]: 0.6124 exceeds limit 0.15"]
  assert check_thresholds({"load_std": 0.15}) == []  # at the limit is fine


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def read_events(tb_dir):
  """Yields Event protos from the TFRecord event files under `tb_dir`."""
  for path in glob.glob(f"{tb_dir}/events.out.tfevents.*"):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[offset + 12:offset + 12 + length])  # skip crc
      yield event
      offset += 12 + length + 4


def test_metrics_writer(tmp_path):
  load = np.array([[4, 2, 1, 1], [0, 4, 4, 0]])
  with MetricsWriter(tmp_path) as writer:
    writer.scalars(1, {"loss": jnp.float32(3.5), "lr": 1e-3})
    balance = writer.expert_load(1, load)
    writer.scalars(2, {"loss": 3.25})
  assert balance["moe/layer_1/dead_experts"] == 2
  assert balance["moe/mean_max_vio"] == pytest.approx(1.0)
  assert writer.history["train/loss"] == [(1, 3.5), (2, 3.25)]

  rows = read_jsonl(tmp_path / "metrics.jsonl")
  assert [row["step"] for row in rows] == [1, 2]  # one line per step
  assert rows[0]["train/loss"] == 3.5 and rows[0]["train/lr"] == 1e-3
  assert rows[0]["moe/layer_0/load_std"] == pytest.approx(math.sqrt(0.375))

  tags = {(v.tag, e.step) for e in read_events(tmp_path / "tb") for v in e.summary.value}
  assert {("train/loss", 1), ("train/loss", 2), ("moe/layer_0/load_std", 1)} <= tags
  histograms = {v.tag: v.histo for e in read_events(tmp_path / "tb")
                for v in e.summary.value if v.HasField("histo")}
  assert list(histograms["moe/layer_1/load"].bucket) == [0, 4, 4, 0]  # one bucket per expert


def test_metrics_writer_appends_on_resume_and_without_tensorboard(tmp_path):
  with MetricsWriter(tmp_path, enabled_tensorboard=False) as writer:
    writer.scalars(1, {"loss": 2.0})
  with MetricsWriter(tmp_path, enabled_tensorboard=False) as writer:
    writer.scalars(2, {"loss": 1.0})
  assert [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
  assert not (tmp_path / "tb").exists()


def test_warn_is_rate_limited_per_key(tmp_path, caplog):
  caplog.set_level(logging.WARNING, logger="moe_jax.train.monitoring")
  with MetricsWriter(tmp_path, warn_every=10) as writer:
    emitted = {step: writer.warn(step, check_thresholds(
        {"layer_0/load_std": 0.2 + step / 100, "layer_1/load_std": 0.3}))
               for step in range(25)}
    # A new key is not held back by another key's recent warning.
    assert writer.warn(25, ["p99_latency_ms: 600 exceeds limit 500"])
  steps_with_warnings = [step for step, messages in emitted.items() if messages]
  assert steps_with_warnings == [0, 10, 20]
  assert emitted[10] == ["layer_0/load_std: 0.3 exceeds limit 0.15",
                         "layer_1/load_std: 0.3 exceeds limit 0.15"]
  assert len(caplog.records) == 3 * 2 + 1
  assert "step 10: layer_0/load_std: 0.3" in caplog.text

  rows = read_jsonl(tmp_path / "metrics.jsonl")
  assert [row["step"] for row in rows] == [0, 10, 20, 25]
  assert rows[1]["warnings"] == emitted[10]
  texts = [v.tag for e in read_events(tmp_path / "tb") for v in e.summary.value]
  assert texts.count("warnings/text_summary") == 7


def test_resume_drops_rows_after_the_checkpoint_and_purges_tensorboard(tmp_path):
  """A run killed at step 5 with its last checkpoint at 3: the resumed writer keeps
  rows 1..3 (and drops a torn last line), TensorBoard gets purge_step=4."""
  with MetricsWriter(tmp_path) as writer:
    for step in range(1, 6):
      writer.scalars(step, {"loss": float(step)})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "train/lo')                      # killed mid-write
  with MetricsWriter(tmp_path, resume_step=3) as writer:
    for step in range(4, 7):
      writer.scalars(step, {"loss": 10.0 + step})
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert [r["train/loss"] for r in rows] == [1, 2, 3, 14, 15, 16]
  purges = [e.step for e in read_events(tmp_path / "tb")
            if e.HasField("session_log") and e.session_log.status == e.session_log.START]
  assert purges == [4]


def test_loss_fluctuation_sees_step_noise_that_window_means_hide():
  # Alternating +-0.5 around a falling line: per-step std 0.5; the means of pairs
  # are exactly on the line (fluctuation 0), which is why the loop passes steps.
  steps = [5.0 - 0.01 * t + (0.5 if t % 2 else -0.5) for t in range(40)]
  pairs = [(a + b) / 2 for a, b in zip(steps[::2], steps[1::2])]
  assert loss_fluctuation(steps) == pytest.approx(0.5, abs=0.01)
  assert loss_fluctuation(pairs) == pytest.approx(0.0, abs=1e-9)
