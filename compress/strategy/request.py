"""Compression requests: the schema (``compress.config.CompressionRequest``, re-exported here) and reading a
JSON-lines file of them.

```python
from compress.strategy.request import CompressionRequest, read_requests
CompressionRequest(sparsity=0.5)                     # or size_bytes=40_000_000, or preference=0.3
CompressionRequest(sparsity=0.6, protect_heads=[[0, 3], [5, 1]], id="user-17")
reqs = read_requests("requests.jsonl")               # one JSON object per line; a bad line → one-line error
```
"""

from __future__ import annotations

import os

from compress.config import BatchConfig, CompressionRequest, StrategySearchConfig, StrategyTrainConfig, build
from compress.errors import CompressError

__all__ = ["CompressionRequest", "StrategyTrainConfig", "StrategySearchConfig", "BatchConfig", "read_requests",
           "head_protect"]


def read_requests(path: str | os.PathLike) -> list[CompressionRequest]:
    """Every non-empty line of ``path`` as a request; ids default to ``req-<line>``; duplicate ids and bad lines
    are one-line errors naming the file and the line."""
    from compress.io.files import read_jsonl

    out, seen = [], {}
    for no, data in read_jsonl(path, "requests", 'one JSON object per line, e.g. {"sparsity": 0.5}'):
        try:
            req = build(CompressionRequest, **data)
        except CompressError as e:
            raise CompressError(f"{path}:{no}: {str(e).removeprefix('config: ')}") from None
        if req.id is None:
            req = req.model_copy(update={"id": f"req-{no:03d}"})
        if req.id in seen:
            raise CompressError(f"{path}:{no}: id '{req.id}' is already used on line {seen[req.id]}")
        seen[req.id] = no
        out.append(req)
    return out


def head_protect(pruner, heads):
    """A ``Protect`` that keeps the attention heads ``[(layer, head), ...]`` of ``pruner.model`` dense (q rows,
    their KV group's k/v rows, output-projection columns: ``compress.heads.layout.head_protect``)."""
    if not heads:
        return None
    from compress.heads.layout import attention_layout
    from compress.heads.layout import head_protect as protect_of

    return protect_of(attention_layout(pruner.model), heads)
