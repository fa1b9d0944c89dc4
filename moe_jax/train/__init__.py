"""Training: optimizer and jitted steps (step.py), the loop (loop.py), orbax
checkpoints (checkpoint.py), metrics and monitoring thresholds (monitoring.py)."""
from moe_jax.train.checkpoint import CheckpointError, Checkpointer
from moe_jax.train.loop import RunResult, TrainingDiverged, evaluate, train
from moe_jax.train.step import (TrainState, eval_step, init_state, jit_steps, loss_fn,
                                make_optimizer, train_step)

__all__ = ["CheckpointError", "Checkpointer", "RunResult", "TrainingDiverged", "evaluate",
           "train", "TrainState", "eval_step", "init_state", "jit_steps", "loss_fn",
           "make_optimizer", "train_step"]
