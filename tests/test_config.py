"""Config validation: presets, ranges, a property-based fuzz of every field of every
config class, and command-line parsing (errors name the field, before compiling)."""
import dataclasses
import json
import math
import typing

import hypothesis
import jax
import numpy as np
import pytest
from hypothesis import strategies as st

from experiments import common, run
from moe_jax import data as data_lib
from moe_jax.config import PRESETS, ModelConfig, TrainConfig, get_config, tiny
from moe_jax.distill import StageConfig
from moe_jax.quant.config import QuantConfig

# Counts XLA compilations, so that a test can show an error came before any.
_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _COMPILES.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)


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
  with pytest.raises(ValueError, match="unknown DataConfig field"):
    data_lib.DataConfig().replace(seq_length=4)


# ---------------------------------------------------------------- the probes of issue 9


@pytest.mark.parametrize("make, field, message", [
    (lambda: get_config("tiny", router_bias="false"), "router_bias", "expected a bool"),
    (lambda: get_config("tiny", norm_eps=math.inf), "norm_eps", "finite"),
    (lambda: get_config("tiny", n_experts=2**70), "n_experts", "expected an int"),
    (lambda: get_config("tiny", n_experts=2**20), "n_experts", r"\[1, 16384\]"),
    (lambda: get_config("tiny", n_layers=3.0), "n_layers", "expected an int"),
    (lambda: get_config("tiny", d_model="abc"), "d_model", "expected an int"),
    (lambda: TrainConfig(freeze="params"), "freeze", "tuple of strings"),
    (lambda: TrainConfig(freeze=("(",)), "freeze", "regular expression"),
    (lambda: TrainConfig(seed="abc"), "seed", "expected an int"),
    (lambda: TrainConfig(seed=2**31), "seed", ""),
    (lambda: TrainConfig(lr=math.inf), "lr", "finite"),
    (lambda: TrainConfig(weight_decay=math.inf), "weight_decay", "finite"),
    (lambda: data_lib.DataConfig(quality_filter="no"), "quality_filter", "bool"),
    (lambda: data_lib.DataConfig(user_data={"prose": 3}), "user_data", ""),
    (lambda: data_lib.DataConfig(curriculum_kind="cosine"), "curriculum_kind", ""),
    (lambda: QuantConfig(matrices=("wq", "embedding")), "matrices", "distinct names"),
    (lambda: StageConfig("s", steps=1, ce=0.0), "ce", "at least one"),
])
def test_issue_probes_name_the_field(make, field, message):
  with pytest.raises(ValueError, match=rf"\.{field}=.*{message}"):
    make()


def test_lossless_normalisation_and_hashable_configs():
  cfg = get_config("tiny", rope_theta=10000, n_layers=np.int64(3), router_bias=np.bool_(True))
  assert type(cfg.rope_theta) is float and type(cfg.n_layers) is int
  assert cfg.router_bias is True
  assert TrainConfig(freeze=["embed", "attn"]).freeze == ("embed", "attn")
  dcfg = data_lib.DataConfig(mixture={"code": 0.5, "prose": 0.25, "math": 0.25},
                             user_data={"prose": "a/*.txt"})
  assert dcfg.mixture_weights == {"code": 0.5, "prose": 0.25, "math": 0.25}
  assert dcfg.user_paths == {"prose": ("a/*.txt",)}
  assert hash(dcfg) == hash(dcfg.replace(seed=0)) and dcfg == dcfg.replace(seed=0)
  assert dcfg != dcfg.replace(seed=1)
  with pytest.raises(dataclasses.FrozenInstanceError):
    dcfg.seq_len = 3
  # Stored as plain tuples: JSON and asdict (run metadata) work.
  record = json.loads(json.dumps(dataclasses.asdict(dcfg)))
  assert data_lib.DataConfig(**{**record, "mixture": dict(record["mixture"]),
                                "user_data": dict(record["user_data"])}) == dcfg


# ---------------------------------------------------------------- the fuzz

# Bad values per annotation, written here independently of moe_jax.config._coerce:
# the wrong type, non-finite floats, ints outside int32 and negative numbers (no
# numeric field of any config allows a negative value).
_HUGE = st.integers(min_value=2**31, max_value=2**80) | st.integers(max_value=-1,
                                                                    min_value=-2**80)
_BAD = {
    int: st.floats() | st.text(max_size=4) | st.booleans() | st.none() | _HUGE
    | st.lists(st.integers(), max_size=2),
    float: st.text(max_size=4) | st.booleans() | st.none()
    | st.sampled_from([math.inf, -math.inf, math.nan, 10**400])
    | st.floats(min_value=-1e300, max_value=-1e-6),
    bool: st.text(max_size=6) | st.integers(0, 1) | st.floats() | st.none(),
    str: st.integers() | st.floats() | st.booleans() | st.none()
    | st.tuples(st.text(max_size=3)),
    tuple[str, ...]: st.text(min_size=1, max_size=6) | st.integers() | st.none()
    | st.tuples(st.integers()),
    tuple[int, ...]: st.text(min_size=1, max_size=6) | st.integers() | st.none()
    | st.tuples(st.text(max_size=3)) | st.tuples(st.floats()) | st.tuples(_HUGE),
    int | None: st.floats() | st.text(max_size=4) | st.booleans() | _HUGE,
    str | tuple[tuple[str, float], ...]: st.integers() | st.floats() | st.none()
    | st.booleans() | st.text(max_size=6).filter(
        lambda t: t not in ("uniform", "curriculum")),
    tuple[tuple[str, tuple[str, ...]], ...]: st.text(min_size=1, max_size=6)
    | st.integers() | st.none() | st.booleans(),
}

# Every config class with a valid base from which one field is changed.
_BASES = {
    ModelConfig: lambda: dataclasses.asdict(tiny()),
    TrainConfig: dict,
    data_lib.DataConfig: dict,
    QuantConfig: dict,
    StageConfig: lambda: dict(name="s", steps=1),
}
_FIELDS = [(cls, f.name, typing.get_type_hints(cls)[f.name])
           for cls in _BASES for f in dataclasses.fields(cls)]


def test_fuzz_covers_every_field_of_every_config():
  assert len(_FIELDS) > 90
  missing = [(c.__name__, name, hint) for c, name, hint in _FIELDS if hint not in _BAD]
  assert not missing, f"add bad-value strategies for {missing}"


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(st.data())
def test_fuzz_every_bad_field_value_is_refused_naming_the_field(draw):
  cls, name, hint = draw.draw(st.sampled_from(_FIELDS), label="field")
  value = draw.draw(_BAD[hint], label="value")
  compiles = len(_COMPILES)
  with pytest.raises((ValueError, TypeError), match=rf"^{cls.__name__}\.{name}="):
    cls(**{**_BASES[cls](), name: value})
  assert len(_COMPILES) == compiles


# ---------------------------------------------------------------- the command line


def test_cli_parses_by_annotation():
  model = common.apply_overrides(get_config("tiny"), {"router_bias": "false",
                                                       "norm_eps": "1e-5"}, "model")
  assert model.router_bias is False and model.norm_eps == 1e-5
  train = common.apply_overrides(TrainConfig(), {"freeze": "attn, embed"}, "train")
  assert train.freeze == ("attn", "embed")
  dcfg = common.apply_overrides(data_lib.DataConfig(), {
      "mixture": "code:0.5,prose:0.25,math:0.25", "max_bytes_per_domain": "none",
      "user_data": "math:a/*.txt,math:b.jsonl", "domains": "code,prose,math"}, "data")
  assert dcfg.mixture_weights == {"code": 0.5, "prose": 0.25, "math": 0.25}
  assert dcfg.max_bytes_per_domain is None
  assert dcfg.user_paths == {"math": ("a/*.txt", "b.jsonl")}
  assert common.apply_overrides(dcfg, {"mixture": "curriculum"}, "data").mixture == \
      "curriculum"


@pytest.mark.parametrize("section, cfg, field, text, expected", [
    ("model", get_config("tiny"), "d_model", "abc", "expected an int"),
    ("model", get_config("tiny"), "n_layers", "2.5", "expected an int"),
    ("model", get_config("tiny"), "router_bias", "maybe", "expected a bool"),
    ("train", TrainConfig(), "lr", "fast", "expected a finite float"),
    ("data", data_lib.DataConfig(), "max_bytes_per_domain", "1.5", "expected an int or None"),
    ("data", data_lib.DataConfig(), "user_data", "no_colon", "expected a {name: a tuple of strings} mapping, written key:value"),
])
def test_cli_parse_errors_name_the_field(section, cfg, field, text, expected):
  with pytest.raises(ValueError, match=rf"^{section}\.{field}='{text}': {expected}"):
    common.apply_overrides(cfg, {field: text}, section)


@pytest.mark.parametrize("override, message", [
    ("model.d_model=abc", r"model\.d_model='abc': expected an int"),
    ("model.norm_eps=inf", r"ModelConfig\.norm_eps=inf"),
    ("train.freeze=(", r"TrainConfig\.freeze=\('\(',\)"),
    ("data.mixture=code:1", r"DataConfig\.mixture=.*exactly the domains"),
])
def test_runner_refuses_bad_overrides_before_compiling(override, message, tmp_path):
  compiles = len(_COMPILES)
  with pytest.raises(ValueError, match=message):
    run.main(["--exp=pretrain", "--quick", "--no-progress", f"--workdir={tmp_path}",
              override])
  assert len(_COMPILES) == compiles
