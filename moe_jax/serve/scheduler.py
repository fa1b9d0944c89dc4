"""Request scheduling over the engine's slots: static, continuous, and the source's
continuous batching with S/M/L/XL length classes.

    queue ──admit──> prefill (padded to a bucket) ──insert──> slots ──generate──> tokens
      ^                                                         │ finished: slot freed
      └────────────── every step (continuous) ──────────────────┘

  static       wait for B requests (or the end of the trace), prefill them together
               padded to the longest, run until the longest is done, then return them
               all; no slot is refilled before the whole batch ends.
  continuous   every step, each free slot takes the oldest queued request (Orca, Yu
               et al. 2022); the requests admitted at one step are prefilled together,
               one batch per length bucket, each padded forward to its bucket.
  classes      the source's variant: requests are sorted into length classes
               S/M/L/XL by their total length (prompt + max new tokens, <= 1/8, 1/4,
               1/2, 1 of the context); free slots take the oldest request together with
               the queued requests of its class whose prompt length is within +-10% of
               it (prefilled like continuous: one batch per bucket per step).

One step = admit (prefills and inserts dispatched, nothing awaited) + one generate
over all B slots + ONE device -> host transfer of the admitted requests' first tokens
and the step's tokens: the host never waits on the device more than once a step, and
every policy runs the same compiled prefill / insert / generate programs.

Accounting (the source's "utilisation", 68% -> 89%): `useful` counts real tokens (prompt
tokens prefilled, generated tokens that a request keeps), `computed` the token slots the
accelerator computed (padded prefill rows x bucket, B per generate step, idle or not).
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable

import jax

from moe_jax.serve.engine import Engine, bucket_for
from moe_jax.serve.sampling import SamplingConfig

POLICIES = ("static", "continuous", "classes")
CLASS_NAMES = ("S", "M", "L", "XL")
CLASS_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1.0)


@dataclasses.dataclass
class Request:
  prompt: list[int]
  max_new_tokens: int = 32
  sampling: SamplingConfig = SamplingConfig()
  stop: tuple[str, ...] = ()
  arrival: float = 0.0
  id: int = 0
  on_finish: Callable[["Request"], None] | None = None
  # Filled in by the scheduler.
  output: list[int] = dataclasses.field(default_factory=list)
  text: str = ""
  finish_reason: str = ""              # "length" | "stop" | "eos"
  first_token_time: float | None = None
  finish_time: float | None = None

  @property
  def total_len(self) -> int:
    return len(self.prompt) + self.max_new_tokens


def length_class(total_len: int, max_len: int) -> int:
  """Index into CLASS_NAMES: the first class whose bound (a fraction of the context)
  holds the request's prompt + new tokens."""
  for i, f in enumerate(CLASS_FRACTIONS):
    if total_len <= max(1, int(max_len * f)):
      return i
  return len(CLASS_FRACTIONS) - 1


def class_group(queue: list[Request], free: int, max_len: int,
                tolerance: float = 0.1) -> list[Request]:
  """The oldest request and, oldest first, the queued requests of its class whose
  prompt length is within +-tolerance of its own, at most `free` in all."""
  head = queue[0]
  cls, n = length_class(head.total_len, max_len), len(head.prompt)
  group = [head]
  for r in queue[1:]:
    if len(group) == free:
      break
    if (length_class(r.total_len, max_len) == cls
        and abs(len(r.prompt) - n) <= tolerance * n):
      group.append(r)
  return group


class Scheduler:
  def __init__(self, engine: Engine, params, *, policy: str = "continuous",
               detokenize: Callable[[list[int]], str] | None = None,
               eos_id: int | None = None, clock: Callable[[], float] = time.perf_counter,
               tolerance: float = 0.1):
    if policy not in POLICIES:
      raise ValueError(f"unknown scheduling policy {policy!r}; allowed: {POLICIES}")
    self.engine, self.params, self.policy = engine, params, policy
    self.detokenize, self.eos_id, self.clock = detokenize, eos_id, clock
    self.tolerance = tolerance
    self.stats = {"useful": 0, "computed": 0, "steps": 0, "prefills": 0}
    self.draining = False        # static: no more arrivals, run a partial batch
    self.reset()

  def reset(self) -> None:
    """Empty slots and queue, fresh cache (after a failure)."""
    self.state = self.engine.init_decode_state()
    self.slots: list[Request | None] = [None] * self.engine.batch
    self.queue: collections.deque[Request] = collections.deque()
    self._static_batch: list[Request] = []

  # ------------------------------------------------------------------ intake ---
  def check(self, request: Request) -> None:
    """Raise ValueError naming what is wrong with a request (before queueing)."""
    n, max_len = len(request.prompt), self.engine.max_len
    if n < 1:
      raise ValueError("the prompt is empty")
    if n >= max_len:
      raise ValueError(f"the prompt has {n} tokens; the context is {max_len}, so it "
                       f"must have at most {max_len - 1}")
    if request.max_new_tokens < 1:
      raise ValueError(f"max_tokens={request.max_new_tokens} must be >= 1")

  def submit(self, request: Request) -> None:
    self.check(request)
    self.queue.append(request)

  @property
  def active(self) -> int:
    return sum(r is not None for r in self.slots)

  @property
  def idle(self) -> bool:
    return not self.queue and not self.active

  # ------------------------------------------------------------------- admit ---
  def _groups(self) -> list[list[Request]]:
    free = [i for i, r in enumerate(self.slots) if r is None]
    if self.policy == "static":
      if self.active or not self.queue or (
          len(self.queue) < self.engine.batch and not self.draining):
        return []
      return [[self.queue.popleft() for _ in range(min(len(free), len(self.queue)))]]
    groups = []
    while free and self.queue:
      if self.policy == "continuous":
        group = [self.queue[0]]
      else:
        group = class_group(list(self.queue), len(free), self.engine.max_len,
                            self.tolerance)
      for r in group:
        self.queue.remove(r)
      groups.append(group)
      free = free[len(group):]
    return groups

  def _admit(self) -> list[tuple[list[Request], object]]:
    """Prefill and insert this step's admissions without waiting for the device:
    one prefill (rows padded to a power of two) and one insert per length bucket
    among them, however many arrived. Returns (requests, their first tokens, still
    on the device), read with the step's generated tokens in one transfer."""
    admitted = [r for group in self._groups() for r in group]
    if not admitted:
      return []
    free = [i for i, r in enumerate(self.slots) if r is None]
    by_bucket: dict[int, list[Request]] = {}
    for r in admitted:
      by_bucket.setdefault(bucket_for(len(r.prompt), self.engine.buckets), []).append(r)
    pending = []
    for bucket, group in sorted(by_bucket.items()):
      prefix = self.engine.prefill(self.params, [r.prompt for r in group],
                                   [r.sampling for r in group], bucket=bucket)
      slots, free = free[:len(group)], free[len(group):]
      for slot, r in zip(slots, group):
        self.slots[slot] = r
      self.state = self.engine.insert(prefix, self.state, slots)
      self.stats["prefills"] += 1
      self.stats["computed"] += prefix.tokens.shape[0] * bucket
      self.stats["useful"] += sum(len(r.prompt) for r in group)
      pending.append((group, prefix.tokens))
    if self.policy == "static":
      self._static_batch = admitted
    return pending

  # ------------------------------------------------------------------- steps ---
  def _append(self, r: Request, token: int, now: float) -> bool:
    """Record one generated token; True when the request is done."""
    self.stats["useful"] += 1
    if self.eos_id is not None and token == self.eos_id:
      r.finish_reason = "eos"
    else:
      r.output.append(token)
      if self.detokenize is not None:
        r.text = self.detokenize(r.output)
        cut = [r.text.find(s) for s in r.stop if s and s in r.text]
        if cut:
          r.text, r.finish_reason = r.text[:min(cut)], "stop"
      room = self.engine.max_len - len(r.prompt)   # the last fed position is max_len-1
      if not r.finish_reason and len(r.output) >= min(r.max_new_tokens, room):
        r.finish_reason = "length"
    if r.finish_reason and self.policy != "static":
      self._finish(r, now)
    return bool(r.finish_reason)

  def _finish(self, r: Request, now: float) -> None:
    r.finish_time = now
    if r.on_finish is not None:
      r.on_finish(r)

  def step(self) -> list[Request]:
    """Admit, then one generate step over all slots, then one device -> host
    transfer (the admitted requests' first tokens and the step's tokens). Returns the
    requests finished in this step (with static batching: the whole batch, once its
    longest is done)."""
    pending = self._admit()
    finished = []
    if self.active:
      # The furthest position fed this step: a request admitted now (no output on
      # the host yet) feeds its first token at len(prompt).
      furthest = max(len(r.prompt) + max(len(r.output), 1) - 1
                     for r in self.slots if r is not None)
      self.state, tokens = self.engine.generate(
          self.params, self.state, self.engine.kv_bucket(furthest))
      firsts, tokens = jax.device_get(([t for _, t in pending], tokens))
      now = self.clock()
      for (group, _), first in zip(pending, firsts):
        for r, token in zip(group, first):
          r.first_token_time = now
          if self._append(r, int(token), now):
            finished.append(r)
      self.stats["steps"] += 1
      self.stats["computed"] += self.engine.batch
      for i, r in enumerate(self.slots):
        if r is None:
          continue
        if not r.finish_reason and self._append(r, int(tokens[i]), now):
          finished.append(r)
        if self.policy != "static" and r.finish_reason:
          self.slots[i] = None
    if self.policy == "static" and self._static_batch and all(
        r.finish_reason for r in self._static_batch):
      now = self.clock()
      for r in self._static_batch:
        self._finish(r, now)
      finished = list(self._static_batch)
      self._static_batch, self.slots = [], [None] * self.engine.batch
    elif self.policy == "static":
      finished = []
    return finished

  def run(self, requests: list[Request]) -> list[Request]:
    """Serve requests that are all queued now, until every one is finished."""
    for r in requests:
      self.submit(r)
    self.draining = True
    done = []
    while not self.idle:
      done += self.step()
    return done
