"""A training run that kills itself (SIGKILL) at a chosen moment: tests/test_train.py's
kill-and-resume test runs it in a subprocess.

    python tests/train_child.py WORKDIR after_row:3      # row 3 on disk, no checkpoint 3
    python tests/train_child.py WORKDIR mid_save:4       # items written, step not committed
    python tests/train_child.py WORKDIR after_save:6     # checkpoint 6 committed

Same set-up as tests/conftest.py (8 CPU devices, highest matmul precision), so the
compiled step is the one the parent process runs.
"""
import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import chex  # noqa: E402

chex.set_n_cpu_devices(8)
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
from orbax.checkpoint._src.handlers import composite_checkpoint_handler as cch  # noqa: E402

from moe_jax.train import checkpoint, monitoring, train  # noqa: E402
from tests.test_train import DATA, MODEL, TRAIN  # noqa: E402


def die():
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def main(workdir: str, when: str):
  kind, step = when.split(":")
  step = int(step)
  if kind == "after_row":
    flush = monitoring.MetricsWriter.flush
    def flush_then_die(self):
      row_step = self._row.get("step")
      flush(self)
      if row_step == step:
        die()
    monitoring.MetricsWriter.flush = flush_then_die
  elif kind == "mid_save":
    finalize = cch.CompositeCheckpointHandler.finalize
    saving = {}
    save = checkpoint.Checkpointer.maybe_save
    def save_marked(self, s, *args, **kw):
      saving["step"] = int(s)
      return save(self, s, *args, **kw)
    def finalize_or_die(self, directory):
      if saving.get("step") == step:
        die()                    # every item written, the step not yet committed
      return finalize(self, directory)
    checkpoint.Checkpointer.maybe_save = save_marked
    cch.CompositeCheckpointHandler.finalize = finalize_or_die
  elif kind == "after_save":
    save = checkpoint.Checkpointer.maybe_save
    def save_then_die(self, s, *args, **kw):
      saved = save(self, s, *args, **kw)
      if int(s) == step:
        die()
      return saved
    checkpoint.Checkpointer.maybe_save = save_then_die
  else:
    raise ValueError(f"unknown kill point {when!r}")
  train(MODEL, DATA, TRAIN, workdir, progress=False)
  print("finished without being killed")


if __name__ == "__main__":
  main(*sys.argv[1:])
