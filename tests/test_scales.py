"""The three scales of every experiment (experiments/common.py SCALES): quick, default
and full (a GPU). A full run cannot be trained here, so its configs are checked: they
validate, and each scale trains a larger model on more tokens than the one below."""
import importlib

import pytest

from experiments import common, run
from moe_jax.models.counting import count_params

WITH_CONFIGS = [n for n in run.available()
                if hasattr(importlib.import_module(f"experiments.{n}"), "configs")]


def test_every_trained_experiment_has_scaled_configs():
  assert set(WITH_CONFIGS) >= {"adaptive_compute", "alignment", "balance_ablation",
                               "curriculum", "data_quality", "distill_stages", "finetune",
                               "kg_fusion", "qat_ablation", "sharing_ablation"}


@pytest.mark.parametrize("name", WITH_CONFIGS)
def test_full_is_larger_than_default(name):
  configs = importlib.import_module(f"experiments.{name}").configs
  sizes = []
  for scale in ("default", "full"):
    model, data, train = configs(scale)[:3]
    data.validate()
    sizes.append((count_params(model).active, train.steps * data.batch_tokens,
                  model.max_seq_len >= data.seq_len))
  (d_params, d_tokens, d_fits), (f_params, f_tokens, f_fits) = sizes
  assert d_fits and f_fits
  assert f_params > 2 * d_params and f_tokens > 2 * d_tokens


def test_sharing_full_is_the_source_depth():
  """At --full the source's scheme runs at its own 24 layers, unscaled."""
  from experiments.sharing_ablation import configs
  model = configs("full")[0]
  assert model.n_layers == 24
  assert count_params(model.replace(sharing="source")).total < count_params(model).total


def test_at_and_the_context(tmp_path):
  assert [common.at(s, 1, 2, 3) for s in common.SCALES] == [1, 2, 3]
  with pytest.raises(ValueError, match="allowed"):
    common.at("large", 1, 2, 3)
  ctx = common.Context.create("pretrain", scale="full", workdir=str(tmp_path))
  assert not ctx.quick and "--full" in ctx.command.split()
  assert common.Context.create("pretrain", scale="quick", workdir=str(tmp_path)).quick


def test_quick_and_full_exclude_each_other(capsys):
  with pytest.raises(SystemExit):
    run.main(["--exp=pretrain", "--quick", "--full"])
  assert "not allowed with argument" in capsys.readouterr().err
