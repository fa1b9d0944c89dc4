"""Run one experiment: python -m experiments.run --exp=NAME [--quick] [overrides].

    python -m experiments.run --exp=balance_ablation
    python -m experiments.run --exp=sharing_ablation --quick --workdir /tmp/share
    python -m experiments.run --exp=sharing_ablation --full       # a GPU's scale
    python -m experiments.run --exp=balance_ablation model.n_experts=32 train.steps=400
    python -m experiments.run --exp=balance_ablation --fresh     # old run moved aside
    python -m experiments.run --exp=pretrain --model=seed_24l --mesh=gpu_pod_64 --distributed
    python -m experiments.run --exp=pretrain --data 'corpus/*.jsonl' --data-field text
    python -m experiments.run --list

User data: `--data PATH_OR_GLOB` (repeatable; .txt one document per file, .jsonl one
per line's --data-field, .array_record one per record) trains on the domain
--data-domain (default "user") alone, unless data.domains=... lists other domains too
(then data.mixture=user:0.5,code:0.5 sets the weights). It is shorthand for the
overrides data.user_data=DOMAIN:GLOB data.domains=DOMAIN data.text_field=FIELD.

Experiments are the modules `experiments/<NAME>.py` with a `run(ctx)` function; the
runner owns the work directory, overrides, seeds and the results files
(results.json, results.md, plots).
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import jax

from experiments import common

NOT_EXPERIMENTS = {"run", "common", "plots", "results"}


def available() -> list[str]:
  import experiments
  return sorted(m.name for m in pkgutil.iter_modules(experiments.__path__)
                if m.name not in NOT_EXPERIMENTS and not m.name.startswith("_"))


def describe(name: str) -> str:
  doc = importlib.import_module(f"experiments.{name}").__doc__ or ""
  return doc.strip().splitlines()[0] if doc.strip() else ""


def data_overrides(args) -> list[str]:
  """The data.* overrides that --data, --data-field, --data-domain, --data-errors
  stand for (so that results.json records them as overrides)."""
  out = []
  if args.data:
    if any("," in p for p in args.data):
      raise SystemExit(f"--data {args.data}: a path or glob may not contain ','")
    out.append(f"data.user_data={','.join(f'{args.data_domain}:{p}' for p in args.data)}")
    if not any(o.startswith("data.domains=") for o in args.overrides):
      out.append(f"data.domains={args.data_domain}")
  elif args.data_field or args.data_errors:
    raise SystemExit("--data-field / --data-errors need --data")
  if args.data_field:
    out.append(f"data.text_field={args.data_field}")
  if args.data_errors:
    out.append(f"data.decode_errors={args.data_errors}")
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.run", description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="overrides: section.field=value, sections model, data, train "
             "(e.g. model.top_k=1 train.steps=200 data.seq_len=64)")
  parser.add_argument("--exp", help="experiment name (see --list)")
  parser.add_argument("--list", action="store_true", help="list the experiments")
  scale = parser.add_mutually_exclusive_group()
  scale.add_argument("--quick", action="store_true",
                     help="a smoke run of every code path in CPU minutes (what the tests run)")
  scale.add_argument("--full", action="store_true",
                     help="the experiment at a GPU's scale: wider and deeper models, more "
                          "tokens (BUILD.md)")
  parser.add_argument("--workdir", default=None, help="default: runs/<exp>[_quick|_full]")
  parser.add_argument("--seeds", type=int, default=None,
                      help="number of seeds (default: the experiment's own)")
  parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
  parser.add_argument("--fresh", action="store_true",
                      help="move an existing work directory to <workdir>.old-<timestamp> "
                           "(nothing is deleted) and start every run over; without it, "
                           "runs resume from their checkpoints, and a run whose configs "
                           "differ from its checkpoint's is refused")
  parser.add_argument("--model", default=None,
                      help="model preset for experiments that take one (e.g. pretrain)")
  parser.add_argument("--mesh", default=None,
                      help="mesh preset from moe_jax.planner (e.g. gpu_node_8, gpu_pod_64); "
                           "default: one device")
  parser.add_argument("--distributed", action="store_true",
                      help="join a multi-host job with jax.distributed.initialize (SLURM, "
                           "Open MPI, Kubernetes and TPU are auto-detected; else pass the "
                           "three options below)")
  parser.add_argument("--coordinator", default=None, help="host:port of process 0")
  parser.add_argument("--num-processes", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None)
  parser.add_argument("--data", action="append", default=None, metavar="PATH_OR_GLOB",
                      help="user data: .txt / .jsonl / .array_record files (globs, "
                           "repeatable); validated before the first step")
  parser.add_argument("--data-field", default=None,
                      help="the JSONL field holding each document (default: text)")
  parser.add_argument("--data-domain", default="user",
                      help="domain name of the --data files (default: user)")
  parser.add_argument("--data-errors", default=None,
                      choices=("strict", "replace", "ignore"),
                      help="undecodable bytes: strict (default) refuses the file, "
                           "replace / ignore decode anyway")
  parser.add_argument("overrides", nargs="*", help="section.field=value")
  args = parser.parse_args(argv)
  args.overrides = args.overrides + data_overrides(args)

  names = available()
  if args.list or not args.exp or args.exp not in names:
    if args.exp and args.exp not in names:
      print(f"unknown experiment {args.exp!r}.", file=sys.stderr)
    print("experiments:\n" + "\n".join(f"  {n:<20} {describe(n)}" for n in names))
    return 0 if args.list else 2

  flags = os.environ.get("XLA_FLAGS", "")
  if args.quick and "--xla_backend_optimization_level" not in flags:
    # A smoke run compiles far more than it computes: without LLVM's optimisation
    # passes XLA compiles about twice as fast (set before JAX starts its backends; a
    # quick run's tokens/s are not comparable with a default run's, and results.json
    # records the flags). A level already set (the tests', the user's) is kept.
    os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()
  if args.distributed:
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  scale = "quick" if args.quick else "full" if args.full else "default"
  ctx = common.Context.create(args.exp, scale=scale, workdir=args.workdir,
                              overrides=args.overrides, seeds=args.seeds,
                              progress=not args.no_progress and jax.process_index() == 0,
                              model=args.model, mesh=args.mesh, fresh=args.fresh)
  module = importlib.import_module(f"experiments.{args.exp}")
  rows, summary = module.run(ctx)
  if jax.process_index() == 0:
    ctx.write_results(rows, summary)
    print(ctx.markdown(rows, summary))
    print(f"\nresults: {ctx.workdir}/results.md, results.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
