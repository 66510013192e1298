"""`compress bench write-once`: bytes `compress apply` writes, per process, from /proc/self/io, with the code of
this checkout and of another folder (``--before``)."""

import json
import shutil

import pytest

from compress.bench.write_once import checkout, run, source_tree
from compress.errors import CompressError
from tests.conftest import run_cli


def test_run_small_before_and_after(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # "before" is a copy of this package in another folder: the case must import it from there
    old = tmp_path / "old-src"
    shutil.copytree(source_tree() / "compress", old / "compress", ignore=shutil.ignore_patterns("__pycache__"))
    res = tmp_path / "results"
    report = run(size_gb=0.02, workdir=tmp_path / "work", results=res, before=str(old), max_hidden=256,
                 shard_size="8MB", publish_results=False)
    assert json.loads((res / "write_once.json").read_text()) == json.loads(json.dumps(report))
    assert "| apply | after (this checkout) |" in (res / "write_once.md").read_text()
    rows = {(r["command"], r["key"]): r for r in report["cases"]}
    assert sorted(rows) == sorted((c, k) for c in ("apply", "extract", "sparse file", "extract-lora")
                                  for k in ("before", "after"))
    before, after = rows["apply", "before"], rows["apply", "after"]
    assert before["compress"].startswith(str(old)) and after["compress"].startswith(str(source_tree()))
    for r in (before, after):
        # the output is the checkpoint (plus config, card and padded headers), in shards of 8 MB
        assert report["checkpoint_bytes"] <= r["output_bytes"] < 1.01 * report["checkpoint_bytes"]
        assert r["shards"] >= 2
        assert 0.99 < r["wchar_ratio"] < 1.05, r
    # this checkout writes every file once; the old delta, sparse and adapter writers copied theirs behind the header
    for command in ("extract", "sparse file", "extract-lora"):
        assert 0.99 < rows[command, "after"]["wchar_ratio"] < 1.02, rows[command, "after"]
    assert not (tmp_path / "work").exists()  # the scratch folder is gone


def test_before_that_is_neither_a_folder_nor_a_revision_is_one_line(tmp_path):
    with pytest.raises(CompressError, match="--before no-such-rev-h18: neither a folder holding compress/ nor a "
                                            "revision"):
        checkout("no-such-rev-h18", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    code, _, err = run_cli("bench", "write-once", "--size-gb", "0", "--workdir", tmp_path / "w", "--results",
                           tmp_path / "r")
    assert code == 2 and err.strip().count("\n") == 0 and "--size-gb must be positive" in err
    assert not (tmp_path / "w").exists() and not (tmp_path / "r").exists()
