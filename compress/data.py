"""Where the bundled real assets live (``../shared/data``: corpora, llama2.c stories260K) and how to read them.

No hub is reachable, so benchmarks and tests read these files; ``COMPRESS_DATA`` points elsewhere.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

from compress.errors import CompressError

_REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """``$COMPRESS_DATA`` if set, else ``<repo>/../shared/data``, else ``<cwd>/../shared/data``."""
    env = os.environ.get("COMPRESS_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise CompressError(f"COMPRESS_DATA={env}: not a folder")
        return path
    for path in (_REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if path.is_dir():
            return path
    raise CompressError("shared data folder not found (looked for ../shared/data beside the repository and the "
                        "working directory); set COMPRESS_DATA to the folder holding corpus/ and stories260K/")


def corpus_names() -> list[str]:
    folder = data_dir() / "corpus"
    return sorted(p.name[: -len(".txt.gz")] for p in folder.glob("*.txt.gz"))


def corpus_path(name: str) -> Path:
    """A bundled text corpus by name: 'shakespeare', 'wikitext2.valid', 'wikitext2.test', 'ptb.valid', ..."""
    for fname in (f"{name}.txt.gz", f"{name}.txt"):
        path = data_dir() / "corpus" / fname
        if path.is_file():
            return path
    raise CompressError(f"corpus '{name}' not found in {data_dir() / 'corpus'}; available: "
                        f"{', '.join(corpus_names()) or 'none'}")


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file, gzip-compressed when its name ends in .gz."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CompressError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise CompressError(f"{path}: cannot read as UTF-8 text ({e})") from None


def stories260k_files() -> tuple[Path, Path]:
    """(model .bin, tokenizer .bin) of the real pretrained llama2.c stories260K model."""
    folder = data_dir() / "stories260K"
    files = folder / "stories260K.bin", folder / "tok512.bin"
    for f in files:
        if not f.is_file():
            raise CompressError(f"{f}: missing; the shared data folder should hold stories260K/")
    return files
