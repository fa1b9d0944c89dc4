"""Code-completion BLEU: held-out standard-library functions completed from their
signature and docstring, greedy through the serving engine's KV cache, scored with
sacrebleu.

    held-out stdlib file ──ast──> def f(x):                   prompt (dedented)
                                      \"\"\"Return the half of x.\"\"\"
                                      return x / 2            reference body
    [BOS] prompt ──Engine.greedy (KV cache, n_new bytes)──> completion
    clip_body(completion), clip_body(reference) ──sacrebleu.corpus_bleu──> BLEU

The source reports "+2.3 BLEU on code generation" without naming the benchmark;
this is the offline analogue of HumanEval-style completion (Chen et al. 2021):
functions of the standard library from documents the corpus holds out by content
hash (`corpus.is_heldout`), so no model trained on any byte cap of the corpus has
seen them. Both sides are cut by the same rule (`clip_body`): the body's whole lines
up to where the function ends (a line back at column 0) within n_new bytes, so a
completion that stops early or runs on into the next function is scored like the
reference. BLEU is corpus-level, sacrebleu's default 13a tokenisation (it splits
brackets, operators and dots, so code tokens are n-gram units) and exp smoothing.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import textwrap

import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.data import corpus as corpus_lib


@dataclasses.dataclass(frozen=True)
class CodePair:
  name: str          # "doc<i>:<qualified function name>@<line>" (unique per corpus)
  prompt: str        # signature + docstring, dedented to column 0, ending in "\n"
  reference: str     # clip_body of the rest of the function


def clip_body(text: str, max_bytes: int) -> str:
  """The whole lines of a function body (indented, ending in a newline) from the
  start of `text`, up to the first non-blank line at column 0 (the function is
  over) and within `max_bytes` UTF-8 bytes. An unfinished last line (a completion
  cut by its token budget) is dropped."""
  out, used = [], 0
  for line in text.splitlines(keepends=True):
    if line.strip() and not line[0].isspace():
      break
    size = len(line.encode("utf-8"))
    if not line.endswith("\n") or used + size > max_bytes:
      break
    out.append(line)
    used += size
  return "".join(out)


def _functions(tree: ast.AST, prefix: str = ""):
  """(qualified name, node) of every function and method, in source order."""
  for node in ast.iter_child_nodes(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      name = f"{prefix}{node.name}"
      if not isinstance(node, ast.ClassDef):
        yield name, node
      yield from _functions(node, name + ".")
    else:
      yield from _functions(node, prefix)


def extract_pairs(source: str, max_prompt_bytes: int, max_body_bytes: int,
                  tag: str = "") -> list[CodePair]:
  """(prompt, reference) of every function in `source` that has a docstring and a
  statement after it, whose prompt fits in max_prompt_bytes and whose body's first
  line fits in max_body_bytes. Decorators are left out of the prompt; a method is
  dedented to column 0 with its body. Unparsable source gives no pairs."""
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return []
  lines = source.splitlines(keepends=True)
  pairs = []
  for name, node in _functions(tree):
    if ast.get_docstring(node, clean=False) is None or len(node.body) < 2:
      continue
    doc_end = node.body[0].end_lineno               # last line of the docstring
    if node.body[1].lineno <= doc_end:              # `"""doc"""; return x`
      continue
    indent = node.col_offset

    def dedent(chunk, indent=indent):
      # Lines indented less than the def (continuations of a string) stay as they are.
      return "".join(l[indent:] if not l[:indent].strip() else l for l in chunk)
    prompt = textwrap.dedent(dedent(lines[node.lineno - 1:doc_end]))
    if not prompt.endswith("\n"):
      continue
    body = dedent(lines[doc_end:node.end_lineno])
    reference = clip_body(body if body.endswith("\n") else body + "\n", max_body_bytes)
    if reference.strip() and len(prompt.encode("utf-8")) <= max_prompt_bytes:
      pairs.append(CodePair(f"{tag}{name}@{node.lineno}", prompt, reference))
  return pairs


def heldout_pairs(max_prompt_bytes: int, max_body_bytes: int, limit: int
                  ) -> list[CodePair]:
  """Up to `limit` pairs from the held-out code documents of the whole standard
  library (no byte cap: held-out membership is a hash of each document's content, so
  these documents are outside every capped training split too), in corpus order."""
  docs = corpus_lib.build_corpus(("code",), None).split("heldout")["code"]
  pairs: list[CodePair] = []
  for i, doc in enumerate(docs):
    pairs += extract_pairs(doc, max_prompt_bytes, max_body_bytes, tag=f"doc{i}:")
  return pairs[:limit]


@functools.lru_cache(maxsize=16)
def _engine(config: ModelConfig, batch: int, max_len: int):
  """One engine (one set of compiled prefill / insert / generate programs) per model
  shape: runs of the same config (seeds) share its compiles. One bucket: every
  prompt prefills at max_len, every step attends over max_len."""
  from moe_jax.serve.engine import Engine
  return Engine(config, batch=batch, max_len=max_len, buckets=(max_len,))


def complete(variables, config: ModelConfig, prompts: list[str], tokenizer, n_new: int,
             batch: int = 32) -> list[str]:
  """Greedy completions (n_new tokens, cut at EOS) of each prompt after BOS,
  `batch` prompts stepping together through the engine's KV cache."""
  max_len = config.max_seq_len
  ids = [[tokenizer.bos_id] + [int(t) for t in tokenizer.encode(p)] for p in prompts]
  too_long = [i for i, t in enumerate(ids) if len(t) + n_new > max_len]
  if too_long:
    raise ValueError(f"prompt {too_long[0]} ({len(ids[too_long[0]])} tokens) + "
                     f"n_new={n_new} exceeds the context max_seq_len={max_len}")
  engine = _engine(config, min(batch, len(ids)), max_len)
  out = []
  for start in range(0, len(ids), engine.batch):
    for tokens in engine.greedy(variables, ids[start:start + engine.batch], n_new):
      tokens = np.asarray(tokens)
      ended = np.flatnonzero(tokens == tokenizer.eos_id)
      # EOS ends the function: its last line counts as finished.
      text = tokenizer.decode(tokens[:ended[0]] if ended.size else tokens)
      out.append(text + "\n" if ended.size else text)
  return out


def bleu(hypotheses: list[str], references: list[str]) -> float:
  """Corpus BLEU (0-100) of hypotheses against one reference each (sacrebleu)."""
  import sacrebleu                               # an extra: setup.cfg [bleu], [test]
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
  return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def code_bleu(variables, config: ModelConfig, pairs: list[CodePair], tokenizer,
              n_new: int, batch: int = 32) -> dict:
  """BLEU of the clipped greedy completions against the references, the share
  that match exactly (whitespace at line ends aside), and the completions."""
  if not pairs:
    raise ValueError("no code pairs to score (held-out functions that fit the context)")
  texts = complete(variables, config, [p.prompt for p in pairs], tokenizer, n_new, batch)
  hyps = [clip_body(t, n_new) for t in texts]
  refs = [p.reference for p in pairs]
  exact = np.mean([h.rstrip() == r.rstrip() for h, r in zip(hyps, refs)])
  return {"bleu": bleu(hyps, refs), "exact": float(exact), "n": len(pairs),
          "completions": hyps}
