"""One host of the two-process test (tests/test_multiprocess.py): joins the
cluster with jax.distributed.initialize on loopback and trains a few steps on a
mesh that spans both processes. Usage: worker.py PROCESS_ID PORT WORKDIR OUT_JSON."""
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

import jax  # noqa: E402

process_id, port, workdir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                           local_device_ids=[0])

from moe_jax import sharding  # noqa: E402
from moe_jax.train import train  # noqa: E402

from tests.test_multiprocess import DATA, MODEL, TRAIN  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 2
result = train(MODEL, DATA, TRAIN, workdir, mesh=sharding.make_mesh(data=2), progress=False)
with open(out, "w") as f:
  json.dump({"losses": [h["loss"] for h in result.history],
             "eval": result.eval, "process_index": jax.process_index()}, f)
