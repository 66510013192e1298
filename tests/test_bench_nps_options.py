"""`compress bench nps` merge-protocol options: each bad value is one line naming its flag, before any work."""

import pytest
from conftest import run_cli

from compress.bench.nps import MergeProtocol
from compress.errors import CompressError
from compress.search.protocol import TIES_LAMBDAS


@pytest.mark.parametrize("field, value, flag", [
    ("seeds", (), "--merge-seeds"), ("groupings", ("rows",), "--merge-grouping"), ("ms", (0,), "--merge-m"),
    ("strengths", (-1.0,), "--merge-strength"), ("budget", 1, "--merge-budget"),
    ("checkpoints", (500,), "--merge-checkpoints"), ("margin", float("nan"), "--merge-margin"),
    ("lambdas", (), "--merge-lambdas"), ("lambdas", (0.5, 0.0), "--merge-lambdas"),
    ("lambdas", (float("inf"),), "--merge-lambdas")])
def test_bad_protocol_settings_name_their_flag(field, value, flag):
    with pytest.raises(CompressError, match=f"^{flag}"):
        MergeProtocol(**{field: value})


def test_the_default_lambda_grid_is_the_protocol_s_and_the_cli_refuses_a_bad_one(tmp_path):
    assert MergeProtocol().lambdas == TIES_LAMBDAS
    code, out, err = run_cli("bench", "nps", "--zoo-root", tmp_path, "--results", tmp_path / "r", "--parts", "merge",
                             "--merge-lambdas", "0.5,-1")
    assert code == 2 and err.strip().count("\n") == 0 and "--merge-lambdas: each λ a finite number > 0" in err
    assert not (tmp_path / "r").exists()
