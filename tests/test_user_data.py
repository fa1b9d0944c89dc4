"""User data: one test per kind of bad data (each fails before any step, naming the
file, line or domain), the byte cap, lazy reading, and the --data command line."""
import json
import warnings

import jax
import pytest

from experiments import run
from moe_jax import data
from moe_jax.data import corpus as corpus_lib

_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _COMPILES.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)

WORDS = "the cat sat on a mat while the dog ran far away".split()


def doc(i: int, words: int = 40) -> str:
  return f"document {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words))


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return str(path)


def user_cfg(paths, **kw) -> data.DataConfig:
  return data.DataConfig(**{**dict(domains=("user",), seq_len=16, batch_tokens=64,
                                   user_data={"user": paths}), **kw})


def corpus(paths, **kw):
  return data.corpus_from_config(user_cfg(paths, **kw))


# ---------------------------------------------------------------- one test per bad kind


def test_empty_file_is_refused_naming_the_domain_and_file(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match=r"domain 'user' \(.*empty\.txt\) holds no "
                                       "non-empty document"):
    corpus(str(tmp_path / "empty.txt"))


def test_single_tiny_document_is_refused_before_training(tmp_path):
  (tmp_path / "one.txt").write_text("hello world")
  with pytest.raises(ValueError, match="domain 'user' has 1 document.*held-out"):
    corpus(str(tmp_path / "one.txt"))


def test_too_little_data_for_the_heldout_rows_or_a_batch(tmp_path):
  # 40 documents of ~220 bytes: enough for both splits at seq_len 16, not at 4096.
  path = write_jsonl(tmp_path / "d.jsonl", [{"text": doc(i)} for i in range(40)])
  corpus(path)
  with pytest.raises(ValueError, match=r"split of domain 'user' .* packs into 0 rows "
                                       r"of seq_len \+ 1 = 4097 tokens"):
    corpus(path, seq_len=4096, batch_tokens=4096)
  with pytest.raises(ValueError, match=r"fewer than one batch .*data\.batch_tokens"):
    corpus(path, batch_tokens=16 * 1000)


def test_binary_file_is_refused_naming_it_or_decoded_on_request(tmp_path):
  (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 40)
  with pytest.raises(ValueError, match=r"blob\.bin: looks binary \(NUL byte at offset 0\)"):
    corpus_lib.load_documents(str(tmp_path / "blob.bin"))
  (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 10)
  with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8 text .* byte offset 3"):
    corpus_lib.load_documents(str(tmp_path / "latin1.txt"))
  text = corpus_lib.load_documents(str(tmp_path / "latin1.txt"), errors="replace")[0]
  assert text.count("\ufffd") == 10 and text.startswith("caf\ufffd ")


def test_malformed_jsonl_names_file_and_line(tmp_path):
  records = [json.dumps({"text": doc(i)}) for i in range(150)]
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(records) + '\n{"text": "unterminated\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad\.jsonl:151: malformed JSON"):
    corpus(str(path))


def test_json_array_line_is_named(tmp_path):
  path = write_jsonl(tmp_path / "arr.jsonl", [{"text": "a"}, ["not", "an", "object"]])
  with pytest.raises(ValueError, match=r"arr\.jsonl:2: expected a JSON object .* "
                                       "got a JSON list"):
    data.load_jsonl(path)


def test_missing_field_is_named_and_the_field_is_configurable(tmp_path):
  path = write_jsonl(tmp_path / "c.jsonl", [{"content": doc(i)} for i in range(30)])
  with pytest.raises(ValueError, match=r"c\.jsonl:1: no string field 'text' \(missing; "
                                       r"the record has fields \['content'\]\)"):
    corpus(path)
  assert sum(corpus(path, text_field="content").sizes()["user"].values()) > 0


def test_glob_matching_nothing_names_the_pattern(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no files match '.*nothing_\*\.jsonl'"):
    corpus(str(tmp_path / "nothing_*.jsonl"))


def test_oversize_document_is_cut_at_the_cap_and_reported(tmp_path):
  (tmp_path / "a_big.txt").write_text("é" * 3000)       # 6000 bytes, 2 per char
  for i in range(3):
    (tmp_path / f"b{i}.txt").write_text(doc(i))
  # The first document alone exceeds the 1001-byte cap: cut to whole characters.
  with pytest.warns(UserWarning, match=r"max_bytes_per_domain=1,001: its first "
                                       r"document \(6,000 bytes\) was cut to 1,000"):
    docs = corpus_lib._take_bytes(corpus_lib.iter_documents(str(tmp_path / "*.txt")),
                                  1001, notes := [])
    warnings.warn("; ".join(notes))
  assert docs == ["é" * 500]
  # A cap that ends inside the list keeps whole documents and says what it left out.
  paths = [str(tmp_path / f"b{i}.txt") for i in range(3)]
  cap = len(doc(0)) + len(doc(1))
  with pytest.warns(UserWarning, match=r"user data of domain 'user': max_bytes_per_"
                                       r"domain=.*kept the first 2 documents"):
    c = data.build_corpus(("user",), cap, {"user": paths})
  assert sorted(c.train["user"] + c.heldout["user"]) == [doc(0), doc(1)]
  assert "kept the first 2 documents" in c.capped["user"]


def test_reading_is_lazy_and_stops_at_the_cap(tmp_path):
  """Files after the cap are never opened: a binary file there raises nothing."""
  for i in range(4):
    (tmp_path / f"a{i}.txt").write_text(doc(i))
  (tmp_path / "z_binary.txt").write_bytes(b"\0\xff" * 100)
  docs = corpus_lib._take_bytes(corpus_lib.iter_documents(str(tmp_path / "*.txt")),
                                3 * len(doc(0)) + 1)
  assert docs == [doc(0), doc(1), doc(2)]
  with pytest.raises(ValueError, match="z_binary.txt"):
    corpus_lib.load_documents(str(tmp_path / "*.txt"))


def test_mixed_formats_in_one_glob_are_read_by_extension(tmp_path):
  (tmp_path / "a.txt").write_text("plain text")
  write_jsonl(tmp_path / "b.jsonl", [{"text": "json one"}, {"text": "json two"}])
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  writer = array_record_module.ArrayRecordWriter(str(tmp_path / "c.array_record"),
                                                 "group_size:1")
  writer.write("record".encode())
  writer.close()
  assert corpus_lib.load_documents(str(tmp_path / "*")) == [
      "plain text", "json one", "json two", "record"]


# ---------------------------------------------------------------- the command line


TINY = ["model.d_model=32", "model.d_expert=32", "model.n_layers=2", "model.n_heads=2",
        "model.n_kv_heads=2", "model.max_seq_len=32", "data.seq_len=32",
        "data.batch_tokens=256", "train.steps=2", "train.warmup_steps=1",
        "train.log_every=1", "train.eval_batches=1"]


def test_data_flags_become_overrides():
  args = run.argparse.Namespace(data=["c/*.jsonl", "d.txt"], data_field="body",
                                data_domain="legal", data_errors=None,
                                overrides=["data.domains=legal,code"])
  assert run.data_overrides(args) == ["data.user_data=legal:c/*.jsonl,legal:d.txt",
                                      "data.text_field=body"]
  args.overrides = []
  assert "data.domains=legal" in run.data_overrides(args)


@pytest.mark.parametrize("kind, message", [
    ("single", "domain 'user' has 1 document"),
    ("binary", r"blob\.txt: looks binary"),
    ("jsonl", r"bad\.jsonl:3: malformed JSON"),
])
def test_bad_user_data_on_the_command_line_fails_before_compiling(kind, message,
                                                                  tmp_path):
  if kind == "single":
    (tmp_path / "one.txt").write_text("just one document")
    pattern = str(tmp_path / "*.txt")
  elif kind == "binary":
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)))
    pattern = str(tmp_path / "*.txt")
  else:
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n')
    pattern = str(tmp_path / "*.jsonl")
  compiles = len(_COMPILES)
  with pytest.raises(ValueError, match=message):
    run.main(["--exp=pretrain", "--quick", "--no-progress",
              f"--workdir={tmp_path / 'run'}", "--data", pattern] + TINY)
  assert len(_COMPILES) == compiles
