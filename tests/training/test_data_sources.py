"""The user's own data: text globs, JSONL, Parquet, saved Hugging Face datasets and token arrays
all pack into the windows the same documents make by hand; bad sources are one line before
any model loads; the artifact records where its data came from."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from rudder.core.errors import InvalidArgument
from rudder.training import corpus
from rudder.training.corpus import DataSource
from tests.tiny import make_tokenizer

DOCS = [f"Document {k}: the quick brown fox jumps over the lazy dog {k} times. " * (1 + k % 3) for k in range(24)]
CONTEXT = 16


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def by_hand(tok):
    """Every document tokenized with a blank line after it, concatenated, cut into windows."""
    ids = [i for d in DOCS for i in tok(d + "\n\n").input_ids]
    return [ids[i:i + CONTEXT] for i in range(0, len(ids) - CONTEXT + 1, CONTEXT)]


def write_all(tmp_path, tok) -> dict[str, corpus.Spec]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "txt").mkdir()
    for k, d in enumerate(DOCS):
        (tmp_path / "txt" / f"{k:03d}.txt").write_text(d)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"id": k, "body": d}) + "\n" for k, d in enumerate(DOCS)))
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "d.parquet", row_group_size=5)
    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": DOCS}),
                          "test": datasets.Dataset.from_dict({"body": DOCS[:2]})}).save_to_disk(str(tmp_path / "hfd"))
    ids = np.array([i for d in DOCS for i in tok(d + "\n\n").input_ids], dtype=np.uint16)
    np.save(tmp_path / "ids.npy", ids)
    ids.tofile(tmp_path / "ids.bin")
    rows = [tok(d + "\n\n").input_ids for d in DOCS]
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "pretok"))
    return {
        "text glob": str(tmp_path / "txt" / "*.txt"),
        "jsonl": DataSource(path=str(tmp_path / "d.jsonl"), column="body"),
        "parquet": DataSource(path=str(tmp_path / "d.parquet"), column="body"),
        "hf_disk": DataSource(path=str(tmp_path / "hf"), column="body"),
        "hf_disk split": DataSource(path=str(tmp_path / "hfd"), column="body", split="train"),
        "npy": str(tmp_path / "ids.npy"),
        "bin": DataSource(path=str(tmp_path / "ids.bin"), dtype="uint16"),
        "pre-tokenized dataset": DataSource(path=str(tmp_path / "pretok"), column="input_ids"),
    }


def test_every_format_packs_the_windows_its_documents_make_by_hand(tmp_path, tok, by_hand):
    for name, spec in write_all(tmp_path, tok).items():
        assert corpus.token_windows(tok, CONTEXT, sources=[spec]) == by_hand, name
    # a cap reads only what it needs, and built-ins mix with files (round-robin, as before)
    jsonl = DataSource(path=str(tmp_path / "d.jsonl"), column="body")
    assert corpus.token_windows(tok, CONTEXT, max_tokens=3 * CONTEXT, sources=[jsonl]) == by_hand[:3]
    mixed = corpus.token_windows(tok, CONTEXT, max_tokens=4 * CONTEXT, sources=[jsonl, "stdlib"])
    stdlib = corpus.token_windows(tok, CONTEXT, max_tokens=2 * CONTEXT, sources=["stdlib"])
    assert mixed == [by_hand[0], stdlib[0], by_hand[1], stdlib[1]]


def test_a_large_text_file_is_read_in_pieces_that_end_at_a_line(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "PIECE", 64)
    lines = [f"line {k} of a long file\n" for k in range(40)]
    (tmp_path / "big.txt").write_text("".join(lines))
    pieces = list(corpus.read(str(tmp_path / "big.txt")))
    assert len(pieces) > 1 and "".join(pieces) == "".join(lines)
    assert all(p.endswith("\n") for p in pieces)
    # the file goes on after every piece but the last: packing adds a document break only there
    assert [isinstance(p, corpus.Piece) for p in pieces] == [True] * (len(pieces) - 1) + [False]


@pytest.mark.parametrize("make,spec,message", [
    (None, "missing/*.txt", r"not a built-in \(stdlib, wordnet, fortunes\) nor an existing file"),
    (None, "novels", "not a built-in"),
    ("d.jsonl", {"column": "text"}, r"d.jsonl:1: no column 'text' \(it has: id, body\)"),
    ("d.parquet", {"column": "text"}, r"no column 'text' \(it has: body\)"),
    ("hf", {"column": "text"}, r"no column 'text' \(it has: body\)"),
    ("hfd", {"column": "body", "split": "validation"}, r"no split 'validation' \(it has: train, test\)"),
    ("empty.jsonl", {}, "holds no rows"),
    ("bad.jsonl", {}, "bad.jsonl:2: not JSON"),
    ("nulls.jsonl", {}, "holds no rows"),
])
def test_bad_sources_are_one_line_errors_before_training(tmp_path, tok, make, spec, message):
    """The checks before the model loads catch what the first row shows; a bad row later stops the
    packing, which runs before the first step."""
    write_all(tmp_path, tok)
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "nulls.jsonl").write_text('{"text": null}\n')  # null rows are skipped
    if make is not None:
        spec = DataSource(path=str(tmp_path / make), **spec)
    elif spec.startswith("missing"):
        spec = str(tmp_path / spec)
    with pytest.raises(InvalidArgument, match=message):
        corpus.check_sources([spec])
        corpus.token_windows(tok, CONTEXT, sources=[spec])


def test_token_ids_outside_the_models_vocabulary_are_refused(tmp_path, tok):
    np.save(tmp_path / "ids.npy", np.array([1, 2, len(tok) + 5], dtype=np.int64))
    with pytest.raises(InvalidArgument, match=f"token id {len(tok) + 5} .* outside the model's vocabulary"):
        corpus.token_windows(tok, 2, sources=[str(tmp_path / "ids.npy")])


def test_describe_records_each_files_hash_and_each_datasets_fingerprint(tmp_path, tok):
    specs = write_all(tmp_path, tok)
    info = corpus.describe([specs["jsonl"], specs["hf_disk"], "stdlib"])
    jsonl = info[str(tmp_path / "d.jsonl")]
    data = (tmp_path / "d.jsonl").read_bytes()
    assert jsonl == {"format": "jsonl", "column": "body", "files": 1, "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest()}
    assert info[str(tmp_path / "hf")]["rows"] == len(DOCS) and info[str(tmp_path / "hf")]["fingerprint"]
    assert info["stdlib"].startswith("Python ")


def test_train_sae_reads_a_jsonl_and_records_it(tiny_dir, tmp_path):
    from rudder.core.sae import SAE
    from rudder.training.config import load_config
    from rudder.training.sae import run

    rows = [{"body": f"{d} And then number {k}."} for k, d in enumerate(DOCS * 20)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, {"model": str(tiny_dir), "sites": ["blocks.1.hook_resid_post"], "d_sae": 64,
                             "tokens": 2048, "context": 32, "batch_tokens": 256, "buffer_tokens": 1024,
                             "eval_tokens": 512, "out": str(tmp_path / "sae"),
                             "corpus": [{"path": str(tmp_path / "d.jsonl"), "column": "body"}]})
    run(cfg)
    meta = SAE.load(tmp_path / "sae").cfg.metadata
    assert meta["corpus"][str(tmp_path / "d.jsonl")]["sha256"] == hashlib.sha256(
        (tmp_path / "d.jsonl").read_bytes()).hexdigest()
    bad = cfg.model_copy(update={"corpus": [DataSource(path=str(tmp_path / "d.jsonl"))],
                                 "out": tmp_path / "other"})
    with pytest.raises(InvalidArgument, match="no column 'text'"):
        run(bad)
    assert not (tmp_path / "other").exists()
