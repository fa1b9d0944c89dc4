"""The built-in knowledge graph, extracted from the embedded corpus.

    stdlib *.py --ast--> modules, classes, functions
        defined_in     class/function -> module      (top-level definitions)
        has_method     class -> method
        inherits_from  class -> base class           (resolved through imports)
        imports        module -> module
        raises         function -> exception class
        calls          function -> function/class    (names resolvable statically)
    plays (texts/) --> characters, plays
        appears_in     character -> play             ("Persons Represented" lists)

Name resolution is deliberately static and partial: a base, raised exception or
callee is kept only when it resolves, through the module's own top-level names,
its imports or the builtins, to an entity of the graph; everything else
(attributes of instances, dynamic imports) is dropped. The stdlib is walked like
the corpus' code domain (`moe_jax/data/corpus.py`: same root, same skipped
directories), in sorted path order, so the graph is deterministic for a given
Python. It is built once and cached on disk under `cache_dir()`, keyed by a
fingerprint of every source read and of this file, and in-process, since parsing
the stdlib takes a few seconds.
"""
from __future__ import annotations

import ast
import builtins
import functools
import hashlib
import os
import pathlib
import re
import sys
import sysconfig

from moe_jax.data import corpus as corpus_lib
from moe_jax.kg.graph import KnowledgeGraph, from_triples

RELATIONS = ("defined_in", "has_method", "inherits_from", "imports", "raises", "calls",
             "appears_in")


def cache_dir() -> pathlib.Path:
  """$MOE_JAX_CACHE/kg, default ~/.cache/moe_jax/kg."""
  root = os.environ.get("MOE_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "moe_jax")
  return pathlib.Path(root, "kg")


# ---------------------------------------------------------------- python sources


def module_name(relpath: str) -> str:
  """'json/decoder.py' -> 'json.decoder'; 'json/__init__.py' -> 'json'."""
  parts = relpath[:-3].split("/")
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def stdlib_sources(root: str | None = None) -> list[tuple[str, str]]:
  """(module name, source) of the stdlib files the code domain reads, sorted."""
  root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    # The corpus' own skip list: tests, GUI tools, vendored and installed packages.
    dirnames[:] = sorted(d for d in dirnames if d not in corpus_lib._SKIP_DIRS
                         and not d.startswith("config-"))
    for name in sorted(filenames):
      if name.endswith(".py"):
        rel = pathlib.Path(dirpath, name).relative_to(root).as_posix()
        if "-" not in rel:      # not importable (e.g. scripts named foo-bar.py)
          out.append((module_name(rel), pathlib.Path(dirpath, name).read_bytes()
                      .decode("utf-8", errors="replace")))
  return sorted(out)


def _dotted(node: ast.AST) -> str | None:
  """'a.b.C' for Name / Attribute chains, else None."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if isinstance(node, ast.Name):
    return ".".join([node.id] + parts[::-1])
  return None


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None):
  base = module.split(".") if is_package else module.split(".")[:-1]
  if level > 1:
    base = base[:len(base) - (level - 1)]
  return ".".join(base + ([target] if target else []))


class _ModuleFacts:
  """Definitions and unresolved references of one module (first pass)."""

  def __init__(self, module: str, tree: ast.Module, is_package: bool):
    self.module = module
    self.aliases: dict[str, str] = {}        # local name -> qualified dotted name
    self.defs: list[tuple[str, str]] = []    # (key, short name)
    self.edges: list[tuple[str, str, str]] = []       # resolved now
    self.refs: list[tuple[str, str, str]] = []        # (head key, relation, dotted ref)
    for node in tree.body:
      if isinstance(node, ast.Import):
        for a in node.names:
          self.aliases[a.asname or a.name.split(".")[0]] = (
              a.name if a.asname else a.name.split(".")[0])
          self.refs.append((f"module:{module}", "imports", "@" + a.name))
      elif isinstance(node, ast.ImportFrom):
        src = (_resolve_relative(module, is_package, node.level, node.module)
               if node.level else node.module or "")
        self.refs.append((f"module:{module}", "imports", "@" + src))
        for a in node.names:
          if a.name != "*":
            self.aliases[a.asname or a.name] = f"{src}.{a.name}"
    for node in tree.body:
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        self.aliases[node.name] = f"{module}.{node.name}"
      elif isinstance(node, ast.ClassDef):
        self.aliases[node.name] = f"{module}.{node.name}"
    for node in tree.body:
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        key = f"function:{module}.{node.name}"
        self.defs.append((key, node.name))
        self.edges.append((key, "defined_in", f"module:{module}"))
        self._body_refs(key, node, None)
      elif isinstance(node, ast.ClassDef):
        ckey = f"class:{module}.{node.name}"
        self.defs.append((ckey, node.name))
        self.edges.append((ckey, "defined_in", f"module:{module}"))
        for base in node.bases:
          ref = _dotted(base)
          if ref:
            self.refs.append((ckey, "inherits_from", ref))
        for item in node.body:
          if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            mkey = f"function:{module}.{node.name}.{item.name}"
            self.defs.append((mkey, item.name))
            self.edges.append((ckey, "has_method", mkey))
            self._body_refs(mkey, item, f"{module}.{node.name}")

  def _body_refs(self, key: str, fn: ast.AST, cls: str | None):
    raised = set()       # `raise E(...)` is a raises edge, not also a call of E
    for node in ast.walk(fn):
      if isinstance(node, ast.Raise) and node.exc is not None:
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        raised.add(id(node.exc))
        ref = _dotted(exc)
        if ref:
          self.refs.append((key, "raises", ref))
      elif isinstance(node, ast.Call) and id(node) not in raised:
        ref = _dotted(node.func)
        if ref and cls and ref.startswith("self.") and ref.count(".") == 1:
          self.edges.append((key, "calls", f"function:{cls}.{ref[5:]}"))
        elif ref:
          self.refs.append((key, "calls", ref))

  def qualify(self, ref: str) -> list[str]:
    """Candidate qualified names of a dotted reference, most specific first."""
    head, _, rest = ref.partition(".")
    if head in self.aliases:
      q = self.aliases[head] + ("." + rest if rest else "")
      return [q]
    if not rest and hasattr(builtins, head):
      return [f"builtins.{head}"]
    return []


def _is_builtin_class(qualified: str) -> bool:
  if not qualified.startswith("builtins."):
    return False
  return isinstance(getattr(builtins, qualified[9:], None), type)


def python_triples(sources: list[tuple[str, str]]):
  """(triples, entity types, names) of the given (module, source) pairs."""
  # A module with children is a package (its relative imports start at itself).
  packages = {m.rpartition(".")[0] for m, _ in sources if "." in m}
  facts = []
  for module, source in sources:
    try:
      tree = ast.parse(source)
    except (SyntaxError, ValueError):
      continue      # a few stdlib files target other Python versions
    facts.append(_ModuleFacts(module, tree, module in packages))
  modules = {f.module for f in facts}
  types, names = {}, {}
  for f in facts:
    types[f"module:{f.module}"] = "module"
    names[f"module:{f.module}"] = f.module
    for key, short in f.defs:
      types[key] = key.partition(":")[0]
      names[key] = short
  triples = set()
  for f in facts:
    for h, r, t in f.edges:
      if t in types:
        triples.add((h, r, t))
    for h, r, ref in f.refs:
      if r == "imports":
        target = ref[1:]
        if target in modules and f"module:{target}" != h:
          triples.add((h, r, f"module:{target}"))
        continue
      for q in f.qualify(ref):
        if _is_builtin_class(q):
          key = f"class:{q}"
          types.setdefault(key, "class")
          names.setdefault(key, q[9:])
        else:
          key = next((k for k in (f"class:{q}", f"function:{q}") if k in types), None)
          if key is None:
            continue
        if r == "inherits_from" and not key.startswith("class:"):
          continue
        if r == "raises" and not key.startswith("class:"):
          continue
        if key != h:
          triples.add((h, r, key))
  return triples, types, names


# ---------------------------------------------------------------- plays

_PERSONS = re.compile(r"^\s*(persons represented|dramatis person)", re.I)
_NAME = re.compile(r"^[A-Z][A-Za-z']+( [A-Z][A-Za-z']+){0,2}$")


def play_title(path: pathlib.Path) -> str:
  """'shakespeare_romeo_and_juliet.txt' -> 'Romeo And Juliet'."""
  return path.stem.removeprefix("shakespeare_").replace("_", " ").title()


def play_characters(text: str) -> list[str]:
  """Named characters of the 'Persons Represented' list (before the first ACT)."""
  lines = text.replace("\r\n", "\n").split("\n")
  start = next((i for i, line in enumerate(lines[:200]) if _PERSONS.match(line)), None)
  if start is None:
    return []
  out = []
  for line in lines[start + 1:]:
    if re.match(r"^\s*(ACT|SCENE)\b", line, re.I):
      break
    name = re.split(r"[,.]", line.strip())[0].strip().title()
    if (_NAME.match(name) and name.split()[0] not in ("A", "An", "The", "Two", "Three",
                                                      "And", "Lords", "Other", "Several")
        and name not in out):
      out.append(name)
  return out


def play_triples(texts_dir: pathlib.Path = corpus_lib.TEXTS_DIR):
  triples, types, names = set(), {}, {}
  for path in sorted(texts_dir.glob("shakespeare_*.txt")):
    chars = play_characters(path.read_text(encoding="utf-8"))
    if not chars:
      continue           # the sonnets
    title = play_title(path)
    types[f"play:{title}"], names[f"play:{title}"] = "play", title
    for c in chars:
      key = f"character:{title}/{c}"
      types[key], names[key] = "character", c
      triples.add((key, "appears_in", f"play:{title}"))
  return triples, types, names


# ---------------------------------------------------------------- the graph


def build_graph(sources: list[tuple[str, str]] | None = None, *, plays: bool = True,
                ) -> KnowledgeGraph:
  """The graph of `sources` ((module, source) pairs; default: the stdlib) plus,
  if `plays`, characters and plays. No caching: see `stdlib_graph`."""
  sources = stdlib_sources() if sources is None else sources
  triples, types, names = python_triples(sources)
  if plays:
    t2, ty2, n2 = play_triples()
    triples |= t2
    types.update(ty2)
    names.update(n2)
  return from_triples(triples, types, names, RELATIONS)


def _sources_fingerprint(sources) -> str:
  # This file's own source is part of the key: changed extraction rules never
  # read a graph cached by older ones.
  sha = hashlib.sha256(pathlib.Path(__file__).read_bytes())
  sha.update(f"{sys.version_info[:2]}\0".encode())
  for module, source in sources:
    sha.update(module.encode() + b"\0" + hashlib.sha256(source.encode()).digest())
  for path in sorted(corpus_lib.TEXTS_DIR.glob("shakespeare_*.txt")):
    sha.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
  return sha.hexdigest()[:16]


@functools.lru_cache(maxsize=2)
def stdlib_graph(use_disk_cache: bool = True) -> KnowledgeGraph:
  """The built-in graph (stdlib + plays), built once: in-process cache, then a disk
  cache keyed by the fingerprint of every source file and the extractor version
  (a changed Python or text gives a new key, never a stale graph)."""
  sources = stdlib_sources()
  path = cache_dir() / f"stdlib_{_sources_fingerprint(sources)}.json"
  if use_disk_cache and path.is_file():
    return KnowledgeGraph.load(path)
  graph = build_graph(sources)
  if use_disk_cache:
    path.parent.mkdir(parents=True, exist_ok=True)
    graph.save(path)
  return graph
