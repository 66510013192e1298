"""Prepare what a bare GPU machine needs to build a zoo model, in pieces that fit the device tool's 64 MiB a call:
``python3 -m compress.bench.carry minilm-8task --out .carry``. Only this repository's benchmarks need it, so it is
no command of the product CLI."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compress.errors import CompressError


def run(name: str, out_path: Path = Path(".carry"), overwrite: bool = False) -> dict:
    from compress import zoo

    sizes = zoo.carry(name, out_path, overwrite=overwrite)
    for part, n in sizes.items():
        if part != "out":
            print(f"{out_path / part}: {n / 2**20:.1f} MiB")
    if name == "minilm-8task":
        print("GPU build, two calls back to back (the machine stays warm about 30 s between them):\n"
              f"  1. carry [{out_path}/minilm-a]: mkdir -p /tmp/minilm && cp {out_path}/minilm-a/* /tmp/minilm/\n"
              f"  2. carry [{out_path}/minilm-b, .whl]: cp {out_path}/minilm-b/* /tmp/minilm/ && "
              f"COMPRESS_MINILM=/tmp/minilm python3 -m compress.cli zoo build "
              "minilm-8task --device cuda  (see compress/zoo/README.md)")
    return sizes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python3 -m compress.bench.carry", description=__doc__.split("\n")[0])
    p.add_argument("name", help="Zoo model to prepare for a GPU machine.")
    p.add_argument("--out", type=Path, default=Path(".carry"), help="Folder to prepare (git-ignored).")
    p.add_argument("--overwrite", action="store_true", help="Replace OUT if it exists.")
    args = p.parse_args(argv)
    try:
        run(args.name, args.out, overwrite=args.overwrite)
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
