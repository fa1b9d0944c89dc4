"""The mesh planner: hand-checked memory, and clear refusals."""
import math

import pytest

from moe_jax.config import get_config
from moe_jax.planner import PRESETS, PlanError, main, plan


def test_parameter_memory_by_hand():
  # tiny on data 2 x expert 4: routed expert weights (2 MoE layers x 3 x 8x32x32) are
  # split 4 ways over `expert`; everything else (80,096 - 49,152) is replicated.
  p = plan(get_config("tiny"), "cpu_8_simulated", batch_tokens=8 * 32, seq_len=32)
  expected = (80_096 - 49_152) + 49_152 / 4
  assert math.isclose(p.memory_gb["parameters"], expected * 4 / 1e9)
  assert math.isclose(p.memory_gb["AdamW state"], 2 * expected * 4 / 1e9)
  assert p.tokens_per_device == 8 * 32 // 8
  assert p.comm_gb["expert all-to-all"] > 0 and "fsdp all-gather + reduce-scatter" not in p.comm_gb


def test_refusals_name_the_problem():
  with pytest.raises(PlanError, match="n_experts=12 is not divisible by the expert axis"):
    plan(get_config("tiny", n_experts=12, n_groups=4, topk_groups=2), "gpu_node_8",
         batch_tokens=1 << 16, seq_len=1024)
  with pytest.raises(PlanError, match="batch of 256 sequences cannot be split over the 512"):
    plan(get_config("seed_24l"), "gpu_pod_512", batch_tokens=1 << 20, seq_len=4096)
  with pytest.raises(PlanError, match="GB per device needed .* a H200 has 141 GB"):
    plan(get_config("deepseek_v3"), "gpu_pod_64", batch_tokens=1 << 20, seq_len=4096)
  with pytest.raises(PlanError, match="unknown mesh preset"):
    plan(get_config("tiny"), "gpu_pod_9000", batch_tokens=256, seq_len=32)


@pytest.mark.slow
def test_source_shape_fits_the_64_gpu_pod_and_cli(capsys):
  p = plan(get_config("seed_24l"), "gpu_pod_64", batch_tokens=1 << 20, seq_len=4096)
  assert p.memory_gb["total"] < PRESETS["gpu_pod_64"].device_memory_gb
  assert main(["--model", "seed_24l", "--mesh", "gpu_pod_64"]) == 0
  assert "expert all-to-all" in capsys.readouterr().out
  assert main(["--model", "deepseek_v3", "--mesh", "gpu_node_8"]) == 1
