"""The HTTP endpoint: OpenAI-style completions over the continuous-batching scheduler.

    client ─POST /v1/completions─> aiohttp handler ─validate─> inbox ─┐
    client ─POST ...───────────────> (asyncio, many at once)          │
                                                                      v
        future <─ on_finish ─ Scheduler.step() loop (one thread: admit, generate)

The asyncio side only parses and validates (a bad request gets a 400 that names the
problem; the server keeps serving); one background thread owns the engine and runs
`Scheduler.step()` whenever work is queued, so requests of many clients share each
decode step. End-to-end latencies feed `train.monitoring.THRESHOLDS`
("p99_latency_ms"): GET /health reports the P99 and the warnings.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import queue
import threading
import time

import numpy as np
from aiohttp import web

from moe_jax.serve.sampling import SamplingConfig
from moe_jax.serve.scheduler import Request, Scheduler
from moe_jax.train import monitoring

log = logging.getLogger(__name__)

# field -> (accepted types, default); "model", "n", "stream" for OpenAI compatibility.
FIELDS = {"prompt": ((str,), None), "max_tokens": ((int,), 16),
          "temperature": ((int, float), 0.0), "top_p": ((int, float), 1.0),
          "top_k": ((int,), 0), "stop": ((str, list, type(None)), None),
          "seed": ((int,), 0), "model": ((str,), ""), "n": ((int,), 1),
          "stream": ((bool,), False)}


class BadRequest(ValueError):
  pass


def parse_completion(body, tokenizer, scheduler: Scheduler) -> Request:
  """JSON body -> Request, or BadRequest naming the field and what is allowed."""
  if not isinstance(body, dict):
    raise BadRequest("the body must be a JSON object")
  unknown = sorted(set(body) - set(FIELDS))
  if unknown:
    raise BadRequest(f"unknown field(s) {unknown}; allowed: {sorted(FIELDS)}")
  if "prompt" not in body:
    raise BadRequest("missing field 'prompt' (a string)")
  values = {}
  for name, (types, default) in FIELDS.items():
    value = body.get(name, default)
    if name in body and (not isinstance(value, types) or (
        isinstance(value, bool) and bool not in types)):
      raise BadRequest(f"field {name!r} must be of type "
                       f"{'/'.join(t.__name__ for t in types)}, got {value!r}")
    values[name] = value
  stop = values["stop"]
  stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
  if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
    raise BadRequest("field 'stop' must be a non-empty string or a list of at most 4")
  if values["n"] != 1:
    raise BadRequest("field 'n' must be 1 (one completion per request)")
  if values["stream"]:
    raise BadRequest("field 'stream': streaming is not supported; use stream=false")
  if values["max_tokens"] < 1:
    raise BadRequest(f"field 'max_tokens' must be >= 1, got {values['max_tokens']}")
  try:
    sampling = SamplingConfig(float(values["temperature"]), values["top_k"],
                              float(values["top_p"]), values["seed"])
  except ValueError as e:   # names SamplingConfig's field
    raise BadRequest(str(e)) from e
  request = Request(prompt=[int(t) for t in tokenizer.encode(values["prompt"])],
                    max_new_tokens=values["max_tokens"], sampling=sampling, stop=stop)
  try:
    scheduler.check(request)
  except ValueError as e:
    raise BadRequest(f"field 'prompt': {e}" if "prompt" in str(e)
                     else f"field 'max_tokens': {e}") from e
  return request


class ServingLoop:
  """Runs the scheduler in a background thread; `submit` is thread-safe."""

  def __init__(self, scheduler: Scheduler, window: int = 1000):
    self.scheduler = scheduler
    self.inbox: queue.SimpleQueue = queue.SimpleQueue()
    self.latencies_ms: collections.deque = collections.deque(maxlen=window)
    self._futures: dict[int, concurrent.futures.Future] = {}
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="serve-loop", daemon=True)

  def start(self) -> "ServingLoop":
    self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()
    self._thread.join(timeout=10)

  def submit(self, request: Request) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    request.arrival = time.perf_counter()

    def done(r: Request):
      self.latencies_ms.append(1000 * (r.finish_time - r.arrival))
      self._futures.pop(id(r), None)
      future.set_result(r)
    request.on_finish = done
    self._futures[id(request)] = future
    self.inbox.put(request)
    return future

  def p99_ms(self) -> float | None:
    return float(np.percentile(self.latencies_ms, 99)) if self.latencies_ms else None

  def warnings(self) -> list[str]:
    p99 = self.p99_ms()
    return [] if p99 is None else monitoring.check_thresholds({"p99_latency_ms": p99})

  def _run(self) -> None:
    s = self.scheduler
    while not self._stop.is_set():
      try:
        while True:
          s.submit(self.inbox.get(block=s.idle, timeout=0.05))
      except queue.Empty:
        pass
      if s.idle:
        continue
      try:
        finished = s.step()
      except Exception as e:  # keep serving: fail the requests in flight, reset
        log.exception("decode step failed")
        for r in [r for r in s.slots if r is not None] + list(s.queue):
          future = self._futures.pop(id(r), None)
          if future is not None:
            future.set_exception(e)
        s.reset()
        continue
      if finished:
        for w in self.warnings():
          log.warning(w)


def make_app(loop: ServingLoop, tokenizer, model_name: str = "moe_jax") -> web.Application:
  ids = itertools.count()

  async def completions(request: web.Request) -> web.Response:
    try:
      body = await request.json()
    except ValueError:
      return _error(400, "the body is not valid JSON")
    try:
      req = parse_completion(body, tokenizer, loop.scheduler)
    except BadRequest as e:
      return _error(400, str(e))
    req.id = next(ids)
    try:
      result = await asyncio.wrap_future(loop.submit(req))
    except Exception as e:  # a failed decode step: 500, the next request is served
      return _error(500, f"generation failed: {type(e).__name__}: {e}")
    return web.json_response({
        "id": f"cmpl-{result.id}", "object": "text_completion", "created": int(time.time()),
        "model": model_name,
        "choices": [{"text": result.text, "index": 0, "logprobs": None,
                     "finish_reason": "stop" if result.finish_reason in ("stop", "eos")
                     else "length"}],
        "usage": {"prompt_tokens": len(result.prompt),
                  "completion_tokens": len(result.output),
                  "total_tokens": len(result.prompt) + len(result.output)}})

  async def health(request: web.Request) -> web.Response:
    s = loop.scheduler
    return web.json_response({
        "status": "ok" if loop._thread.is_alive() else "stopped",
        "slots": s.engine.batch, "active": s.active, "queued": len(s.queue),
        "context": s.engine.max_len, "p99_latency_ms": loop.p99_ms(),
        "threshold_ms": monitoring.THRESHOLDS["p99_latency_ms"],
        "warnings": loop.warnings()})

  app = web.Application()
  app.router.add_post("/v1/completions", completions)
  app.router.add_get("/health", health)
  return app


def _error(status: int, message: str) -> web.Response:
  return web.json_response({"error": {"message": message, "type": "invalid_request_error"}},
                           status=status)
