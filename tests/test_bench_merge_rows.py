"""`compress bench merge --rows`: some rows per call, the rest kept from an earlier run with the same settings."""

import json

import pytest
from conftest import run_cli

from compress.bench.merge import chosen_rows, keep_earlier_rows
from compress.bench.merge_zoo import MERGES
from compress.errors import CompressError


def test_rows_are_named_case_blind_and_an_unknown_one_is_refused():
    assert list(chosen_rows("wudi, TSV-M")) == ["WUDI", "TSV-M"]
    assert chosen_rows("ties")["TIES"] == MERGES["TIES"]
    assert chosen_rows(None) is None
    with pytest.raises(CompressError, match=r"unknown row 'nope'; choose from simple average, task arithmetic"):
        chosen_rows("TIES,nope")


def _report(rows, **settings):
    return {"zoo": "lm-zoo", "dev_limit": 100, "test_limit": None, "lambdas": [0.5, 1.0], "device": "cuda",
            "quick": False, "max_tokens": 32768, "seqlen": 256, "rows": rows, **settings}


def test_earlier_rows_with_the_same_settings_join_in_table_order(tmp_path):
    earlier = tmp_path / "merge_lm-zoo.json"
    earlier.write_text(json.dumps(_report({"zero-shot": {"v": "old"}, "TIES": {"v": "old"}, "WUDI": {"v": "old"}})))
    new = _report({"zero-shot": {"v": "new"}, "individual (ptb)": {"v": "new"}, "WUDI": {"v": "new"},
                   "task arithmetic": {"v": "new"}})
    out = keep_earlier_rows(new, earlier)
    assert list(out["rows"]) == ["zero-shot", "individual (ptb)", "task arithmetic", "TIES", "WUDI"]
    assert {k: v["v"] for k, v in out["rows"].items()} == {"zero-shot": "new", "individual (ptb)": "new",
                                                           "task arithmetic": "new", "TIES": "old", "WUDI": "new"}
    other = keep_earlier_rows(_report({"WUDI": {"v": "new"}}, dev_limit=500), earlier)
    assert list(other["rows"]) == ["WUDI"]  # measured with another dev limit: not mixed in
    assert keep_earlier_rows(new, tmp_path / "none.json") is new


def test_cli_refuses_an_unknown_row_in_one_line(tmp_path):
    code, out, err = run_cli("bench", "merge", "lm-zoo", "--zoo-root", tmp_path, "--results", tmp_path / "r",
                             "--rows", "WUDI,nope")
    assert code == 2
    assert err.strip().count("\n") == 0 and "unknown row 'nope'" in err
    assert not (tmp_path / "r").exists()
