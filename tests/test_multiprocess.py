"""Two processes joined by jax.distributed.initialize on loopback train the same
run as one process: same global batches (the data pipeline splits each global batch
between hosts), same losses."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_jax import data as data_lib
from moe_jax.config import TrainConfig, get_config

MODEL = get_config("tiny", max_seq_len=32)
DATA = data_lib.DataConfig(seq_len=32, batch_tokens=256, max_bytes_per_domain=200_000)
TRAIN = TrainConfig(steps=6, warmup_steps=1, lr=3e-3, log_every=1, checkpoint_every=3,
                    eval_batches=1)
ROOT = Path(__file__).parent.parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  from moe_jax.train import train
  single = train(MODEL, DATA, TRAIN, tmp_path / "single", progress=False)

  port = _free_port()
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  procs = [subprocess.Popen(
      [sys.executable, str(ROOT / "tests" / "two_process_worker.py"), str(i), str(port),
       str(tmp_path / "multi"), str(tmp_path / f"out{i}.json")], env=env, cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  for p in procs:
    output, _ = p.communicate(timeout=300)
    assert p.returncode == 0, output.decode()[-3000:]
  outs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
  np.testing.assert_allclose(outs[0]["losses"], outs[1]["losses"], rtol=1e-6)
  np.testing.assert_allclose(outs[0]["losses"], [h["loss"] for h in single.history],
                             rtol=2e-5)
  assert (tmp_path / "multi" / "checkpoints").is_dir()
