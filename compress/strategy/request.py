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

import json
import os
from pathlib import Path

from compress.config import BatchConfig, CompressionRequest, StrategySearchConfig, StrategyTrainConfig, build
from compress.errors import CompressError

__all__ = ["CompressionRequest", "StrategyTrainConfig", "StrategySearchConfig", "BatchConfig", "read_requests",
           "head_protect"]


def read_requests(path: str | os.PathLike) -> list[CompressionRequest]:
    """Every non-empty line of ``path`` as a request; ids default to ``req-<line>``; duplicate ids and bad lines
    are one-line errors naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"{path}: no such requests file (one JSON object per line)")
    out, seen = [], {}
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise CompressError(f"{path} line {no}: not JSON ({e.msg})") from None
        if not isinstance(data, dict):
            raise CompressError(f"{path} line {no}: a request is a JSON object, e.g. {{\"sparsity\": 0.5}}")
        try:
            req = build(CompressionRequest, **data)
        except CompressError as e:
            raise CompressError(f"{path} line {no}: {str(e).removeprefix('config: ')}") from None
        if req.id is None:
            req = req.model_copy(update={"id": f"req-{no:03d}"})
        if req.id in seen:
            raise CompressError(f"{path} line {no}: id '{req.id}' is already used on line {seen[req.id]}")
        seen[req.id] = no
        out.append(req)
    if not out:
        raise CompressError(f"{path}: no requests (one JSON object per line)")
    return out


def head_protect(pruner, heads):
    """A ``Protect`` that keeps the attention heads ``[(layer, head), ...]`` dense. Head masks come from the
    head-importance stage (``compress.heads``); without it in this build, asking for protected heads is an error
    rather than a silently unprotected model."""
    if not heads:
        return None
    try:
        from compress.heads import protect_for_heads  # type: ignore[attr-defined]
    except ImportError:
        raise CompressError("protect_heads needs the head-importance stage (compress.heads), which this build does "
                            "not have; drop protect_heads from the request") from None
    return protect_for_heads(pruner.model, heads)
