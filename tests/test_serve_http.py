"""The HTTP endpoint with a real client (urllib) against a server started here, and
the generate CLI against a checkpoint written here."""
import asyncio
import concurrent.futures
import dataclasses
import json
import socket
import threading
import urllib.error
import urllib.request

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from moe_jax import data as data_lib  # noqa: E402
from moe_jax import generate as generate_cli  # noqa: E402
from moe_jax.config import TrainConfig, get_config  # noqa: E402
from moe_jax.models.transformer import Transformer  # noqa: E402
from moe_jax.serve import server  # noqa: E402
from moe_jax.serve.engine import Engine  # noqa: E402
from moe_jax.serve.load import CheckpointNotServable, load_run  # noqa: E402
from moe_jax.serve.scheduler import Scheduler  # noqa: E402
from moe_jax.train.checkpoint import Checkpointer  # noqa: E402
from moe_jax.train.step import init_state  # noqa: E402

TINY = get_config("tiny", init_std=0.5)
TOK = data_lib.get_tokenizer("byte")


@pytest.fixture(scope="module")
def url():
  variables = nn.meta.unbox(jax.jit(Transformer(TINY).init)(jax.random.PRNGKey(0),
                                                            jnp.zeros((1, 8), jnp.int32)))
  sched = Scheduler(Engine(TINY, batch=4, buckets=(16, 32)), variables,
                    detokenize=TOK.decode, eos_id=TOK.eos_id)
  loop = server.ServingLoop(sched).start()
  app = server.make_app(loop, TOK)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  ready, event_loop = threading.Event(), asyncio.new_event_loop()

  def serve():
    asyncio.set_event_loop(event_loop)
    runner = web.AppRunner(app)
    event_loop.run_until_complete(runner.setup())
    event_loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    ready.set()
    event_loop.run_forever()
  threading.Thread(target=serve, daemon=True).start()
  ready.wait(30)
  yield f"http://127.0.0.1:{port}", loop
  event_loop.call_soon_threadsafe(event_loop.stop)
  loop.stop()


def post(base, body, raw=None):
  data = raw if raw is not None else json.dumps(body).encode()
  req = urllib.request.Request(base + "/v1/completions", data=data,
                               headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=120) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_completion_and_health(url):
  base, loop = url
  status, out = post(base, {"prompt": "def f(", "max_tokens": 5, "temperature": 0.7,
                            "top_p": 0.9, "seed": 1})
  assert status == 200, out
  assert out["object"] == "text_completion" and out["usage"]["prompt_tokens"] == 6
  assert 1 <= out["usage"]["completion_tokens"] <= 5
  assert out["choices"][0]["finish_reason"] in ("length", "stop")
  again = post(base, {"prompt": "def f(", "max_tokens": 5, "temperature": 0.7,
                      "top_p": 0.9, "seed": 1})[1]
  assert again["choices"][0]["text"] == out["choices"][0]["text"]   # same seed
  with urllib.request.urlopen(base + "/health", timeout=30) as r:
    health = json.loads(r.read())
  assert health["status"] == "ok" and health["slots"] == 4
  assert health["p99_latency_ms"] > 0 and isinstance(health["warnings"], list)


@pytest.mark.parametrize("body,raw,needle", [
    (None, b"{not json", "not valid JSON"),
    ({"max_tokens": 4}, None, "missing field 'prompt'"),
    ({"prompt": "x", "max_tokens": -3}, None, "max_tokens"),
    ({"prompt": "x" * 40}, None, "context is 32"),
    ({"prompt": "x", "frobnicate": 1}, None, "unknown field(s) ['frobnicate']"),
    ({"prompt": "x", "temperature": "hot"}, None, "'temperature'"),
    ({"prompt": "x", "top_p": 1.5}, None, "top_p"),
    ({"prompt": "x", "stream": True}, None, "stream"),
    ({"prompt": 123}, None, "'prompt' must be of type str"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(url, body, raw, needle):
  base, _ = url
  status, out = post(base, body, raw)
  assert status == 400 and needle in out["error"]["message"], out
  assert post(base, {"prompt": "ok", "max_tokens": 2})[0] == 200


def test_concurrent_clients_share_decode_steps(url):
  base, loop = url
  steps_before = loop.scheduler.stats["steps"]
  bodies = [{"prompt": f"client {i}", "max_tokens": 6, "seed": i, "temperature": 1.0}
            for i in range(8)]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    results = list(pool.map(lambda b: post(base, b), bodies))
  assert all(status == 200 for status, _ in results)
  tokens = sum(out["usage"]["completion_tokens"] for _, out in results)
  steps = loop.scheduler.stats["steps"] - steps_before
  assert steps < tokens - 8        # requests shared steps (alone: tokens - 8 steps)


def _checkpoint(workdir, meta_model):
  mcfg = TINY
  state = init_state(mcfg, TrainConfig(steps=1, warmup_steps=0), 16)
  with Checkpointer(workdir / "checkpoints", save_every=1) as ckpt:
    ckpt.maybe_save(1, state, data_state={}, meta={"identity": {"model": meta_model}}, force=True)
  return state


def test_generate_cli_reads_the_config_from_the_checkpoint(tmp_path, capsys):
  state = _checkpoint(tmp_path, dataclasses.asdict(TINY))
  variables, cfg, _ = load_run(tmp_path)
  assert cfg == TINY
  jax.tree.map(lambda a, b: None if (a == b).all() else pytest.fail("params differ"),
               variables["params"], state.params)
  assert generate_cli.main(["--workdir", str(tmp_path), "--prompt", "ab",
                            "--max-tokens", "4"]) == 0
  assert capsys.readouterr().out.startswith("ab")


def test_generate_cli_names_a_missing_or_incompatible_checkpoint(tmp_path, capsys):
  assert generate_cli.main(["--workdir", str(tmp_path / "nope"), "--prompt", "a"]) == 2
  assert str(tmp_path / "nope" / "checkpoints") in capsys.readouterr().err
  _checkpoint(tmp_path, {**dataclasses.asdict(TINY), "d_model": 64})
  with pytest.raises(CheckpointNotServable, match="do not match the model config"):
    load_run(tmp_path)
  assert generate_cli.main(["--workdir", str(tmp_path), "--prompt", "a"]) == 2
  assert "checkpoints/1" in capsys.readouterr().err


def test_generate_cli_serves_lora_adapters_merged_and_unmerged(tmp_path, capsys):
  """--adapters: the unmerged engine (W + A@B formed in the step) prints exactly what
  the merged one does, and differs from the base (B != 0); adapters of another
  model config are refused by name."""
  from moe_jax.adapt import lora, storage
  state = _checkpoint(tmp_path, dataclasses.asdict(TINY))
  cfg = lora.LoraConfig(rank=2, alpha=8.0)
  adapters = lora.init_adapters(state.params, cfg, jax.random.key(1))
  adapters = jax.tree.map(lambda x: x + 0.5, adapters)           # B != 0: a real delta
  storage.save_adapters(tmp_path / "ad", adapters, cfg, base=dataclasses.asdict(TINY))
  args = ["--workdir", str(tmp_path), "--prompt", "ab", "--max-tokens", "8"]
  outs = []
  for extra in ([], ["--adapters", str(tmp_path / "ad")],
                ["--adapters", str(tmp_path / "ad"), "--merge-adapters"]):
    assert generate_cli.main(args + extra) == 0
    outs.append(capsys.readouterr().out)
  base, unmerged, merged = outs
  assert unmerged == merged and unmerged != base
  storage.save_adapters(tmp_path / "other", adapters, cfg,
                        base={**dataclasses.asdict(TINY), "d_model": 64})
  assert generate_cli.main(args + ["--adapters", str(tmp_path / "other")]) == 2
  assert "d_model" in capsys.readouterr().err


def test_engine_without_lora_config_refuses_unmerged_adapters():
  variables = nn.meta.unbox(jax.jit(Transformer(TINY).init)(jax.random.PRNGKey(0),
                                                            jnp.zeros((1, 8), jnp.int32)))
  with pytest.raises(ValueError, match="LoraConfig"):
    Engine(TINY, batch=1).greedy({**variables, "adapters": {}}, [[1, 2]], 2)
