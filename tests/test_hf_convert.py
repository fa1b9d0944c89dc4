"""Hugging Face import/export against tiny transformers models (tests/fixtures/hf).

The fixtures were written by tests/fixtures/make_hf_fixtures.py (torch, transformers);
these tests need neither: they convert the saved weights through the CLI path and
compare our logits with the ones transformers computed on a 500-token input.
"""
from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest

from moe_jax.data.tokenizer import get_tokenizer
from moe_jax.hf import archs, convert
from moe_jax.hf.safetensors_io import (MissingTensorError, SafetensorsDir,
                                       write_safetensors)
from moe_jax.hf.tokenizer import load_tokenizer
from moe_jax.models.transformer import Transformer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")


@functools.lru_cache(maxsize=None)
def _forward(config):
  return jax.jit(lambda v, ids: Transformer(config).apply(v, ids)[0])


def _logits(config, params, bias, ids):
  variables = {"params": params, **({"router_bias": bias} if bias else {})}
  return np.asarray(_forward(config)(variables, ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, tmp_path):
  """Convert (CLI function) -> orbax run -> load -> logits == transformers' logits."""
  src = os.path.join(FIXTURES, arch)
  summary = convert.convert_from_hf(src, str(tmp_path / "run"))
  assert summary["architecture"] == arch
  config, params, bias, meta = convert.load_run(str(tmp_path / "run"))
  assert meta["hf"]["architecture"] == arch and meta["identity"]["model"]["n_layers"] >= 2
  ids = np.load(os.path.join(src, "input_ids.npy"))
  ref = np.load(os.path.join(src, "logits.npy"))
  assert ids.shape == (1, 500)
  ours = _logits(config, params, bias, ids)
  assert np.max(np.abs(ours - ref)) <= 1e-4
  np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_features_each_fixture_exercises():
  """The fixtures cover the HF-specific options (else parity would prove less)."""
  cfg = {a: archs.to_model_config(convert.read_hf_config(os.path.join(FIXTURES, a)))
         for a in ARCHS}
  assert cfg["qwen2_moe"].qkv_bias and cfg["qwen2_moe"].shared_expert_gate
  assert cfg["qwen3_moe"].qk_norm and cfg["qwen3_moe"].norm_topk_prob
  assert cfg["deepseek_v2"].attention == "mla" and cfg["deepseek_v2"].q_lora_rank == 0
  assert cfg["deepseek_v2"].n_groups == 4 and cfg["deepseek_v2"].score_func == "softmax"
  assert cfg["deepseek_v2"].rope_scaling == "yarn" and cfg["deepseek_v2"].yarn_mscale_all_dim
  v3 = cfg["deepseek_v3"]
  assert v3.q_lora_rank > 0 and v3.router_bias and v3.score_func == "sigmoid"
  assert v3.n_groups == 4 and v3.n_dense_layers == 1 and v3.route_scale == 2.5


def test_selection_bias_matters():
  """Zeroing the converted e_score_correction_bias changes the logits: the bias
  really is wired into expert selection (and the parity test depends on it)."""
  config, params, bias, _, _ = convert.import_hf(os.path.join(FIXTURES, "deepseek_v3"))
  ids = np.load(os.path.join(FIXTURES, "deepseek_v3", "input_ids.npy"))
  ref = np.load(os.path.join(FIXTURES, "deepseek_v3", "logits.npy"))
  zero = jax.tree.map(np.zeros_like, bias)
  assert np.max(np.abs(_logits(config, params, zero, ids) - ref)) > 1e-2


def test_yarn_matters():
  """The DeepSeek-V2 fixture's YaRN settings change the logits (so its parity test
  checks them): plain RoPE on the same weights is far off."""
  config, params, bias, _, _ = convert.import_hf(os.path.join(FIXTURES, "deepseek_v2"))
  ids = np.load(os.path.join(FIXTURES, "deepseek_v2", "input_ids.npy"))
  ref = np.load(os.path.join(FIXTURES, "deepseek_v2", "logits.npy"))
  plain = config.replace(rope_scaling="none")
  assert np.max(np.abs(_logits(plain, params, bias, ids) - ref)) > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_export_then_import_is_identity(arch, tmp_path):
  config, params, bias, hf, _ = convert.import_hf(os.path.join(FIXTURES, arch))
  shards = convert.export_hf(config, params, bias, str(tmp_path), arch=arch,
                             base_config=hf)
  assert len(shards) == config.n_layers + 1
  config2, params2, bias2, _, arch2 = convert.import_hf(str(tmp_path))
  assert (config2, arch2) == (config, arch)
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  jax.tree.map(np.testing.assert_array_equal, bias2, bias)
  # And the exported tensors are the original HF tensors, bit for bit.
  original, exported = SafetensorsDir(os.path.join(FIXTURES, arch)), SafetensorsDir(
      str(tmp_path))
  assert set(exported.keys()) <= set(original.keys())
  for name in exported.keys():
    np.testing.assert_array_equal(exported.get(name), original.get(name), err_msg=name)


def test_cli_import_and_export(tmp_path, capsys):
  src = os.path.join(FIXTURES, "qwen2_moe")
  assert convert.main(["--from-hf", src, "--to", str(tmp_path / "run")]) == 0
  assert "qwen2_moe" in capsys.readouterr().out
  assert convert.main(["--from-run", str(tmp_path / "run"), "--to-hf",
                       str(tmp_path / "out")]) == 0
  with open(tmp_path / "out" / "model.safetensors.index.json") as f:
    index = json.load(f)
  assert "lm_head.weight" in index["weight_map"]
  assert os.path.isfile(tmp_path / "out" / "tokenizer.json")


def test_tokenizer_from_run(tmp_path):
  convert.convert_from_hf(os.path.join(FIXTURES, "mixtral"), str(tmp_path))
  tok = load_tokenizer(str(tmp_path))
  meta = convert.read_meta(str(tmp_path))
  assert get_tokenizer(meta["identity"]["data"]["tokenizer"]) == tok   # as a training run
  ids = tok.encode("Hello, MoE!")
  assert ids.dtype == np.int32 and len(ids) == len("Hello, MoE!")
  assert tok.decode(ids) == "Hello, MoE!"
  hf = convert.read_hf_config(os.path.join(FIXTURES, "mixtral"))
  assert (tok.bos_id, tok.eos_id) == (hf["bos_token_id"], hf["eos_token_id"])
  assert tok.vocab_size == 128


def test_missing_tensor_is_named(tmp_path):
  src = os.path.join(FIXTURES, "deepseek_v3")
  shutil.copytree(src, tmp_path, dirs_exist_ok=True)
  files = SafetensorsDir(src)
  gone = "model.layers.2.self_attn.kv_b_proj.weight"
  os.remove(tmp_path / "model.safetensors")
  write_safetensors(str(tmp_path / "model.safetensors"),
                    {k: files.get(k) for k in files.keys() if k != gone})
  with pytest.raises(MissingTensorError, match=gone.replace(".", r"\.")):
    convert.import_hf(str(tmp_path))


def test_unknown_architecture_is_named(tmp_path):
  hf = convert.read_hf_config(os.path.join(FIXTURES, "mixtral"))
  hf["architectures"] = ["LlamaForCausalLM"]
  with open(tmp_path / "config.json", "w") as f:
    json.dump(hf, f)
  with pytest.raises(archs.UnsupportedModelError, match="LlamaForCausalLM"):
    convert.import_hf(str(tmp_path))


def test_unsupported_setting_is_named():
  hf = convert.read_hf_config(os.path.join(FIXTURES, "qwen3_moe"))
  with pytest.raises(archs.UnsupportedModelError, match="mlp_only_layers"):
    archs.to_model_config({**hf, "mlp_only_layers": [0]})


def test_fixtures_are_small():
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(FIXTURES)
              for f in fs)
  assert total < 5e6
