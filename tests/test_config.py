import pytest

from moe_jax.config import PRESETS, ModelConfig, get_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
  assert isinstance(get_config(name), ModelConfig)


@pytest.mark.parametrize("overrides, field", [
    (dict(top_k=9), "top_k"),                       # more than n_experts=8
    (dict(n_groups=3), "n_groups"),                 # 3 does not divide 8
    (dict(topk_groups=5), "topk_groups"),           # more than n_groups=4
    (dict(top_k=5, topk_groups=2), "top_k"),        # 2 groups of 2 hold only 4 experts
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(score_func="relu"), "score_func"),
    (dict(dispatch="magic"), "dispatch"),
    (dict(sharing="zigzag"), "sharing"),
    (dict(n_dense_layers=4), "n_dense_layers"),
    (dict(capacity_factor=0.0), "capacity_factor"),
])
def test_out_of_range_values_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
    get_config("tiny", **overrides)


def test_unknown_override_and_preset_are_clear():
  with pytest.raises(ValueError, match="unknown ModelConfig field"):
    get_config("tiny", n_expertz=4)
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    get_config("huge")
