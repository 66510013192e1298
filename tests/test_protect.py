import pytest
import torch

from compress.errors import CompressError
from compress.sparsify.protect import Protect, apply_protect


def test_head_rows_and_cols_kept():
    p = Protect(rows={"q": [(2, 4)]}, cols={"o": [(0, 2)]})
    m = apply_protect(torch.zeros(6, 5, dtype=torch.bool), "q", p)
    assert m.sum() == 10 and m[2:4].all() and not m[:2].any() and not m[4:].any()
    o = p.keep("o", (3, 4))
    assert o[:, :2].all() and not o[:, 2:].any()
    assert p.keep("other", (3, 4)) is None
    assert Protect(tensors=(r"embed",)).keep("model.embed_tokens.weight", (2, 2)).all()


def test_roundtrip_and_errors(tmp_path):
    p = Protect(tensors=("lm_head",), rows={"a": [(0, 1)]})
    p.save(tmp_path / "p.json")
    q = Protect.load(tmp_path / "p.json")
    assert q == p and q.union(Protect(rows={"a": [(3, 4)]})).rows["a"] == [(0, 1), (3, 4)]
    with pytest.raises(CompressError, match="outside 'a'"):
        Protect(rows={"a": [(0, 9)]}).keep("a", (4, 4))
    with pytest.raises(CompressError, match=r"start < stop"):
        Protect(rows={"a": [(3, 3)]})
    with pytest.raises(CompressError, match="2-D"):
        Protect(cols={"b": [(0, 1)]}).keep("b", (4,))
    with pytest.raises(CompressError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        Protect.load(tmp_path / "bad.json")
