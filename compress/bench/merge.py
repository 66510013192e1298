"""`compress bench merge ZOO`: the merge benchmark on minilm-8task (``merge_zoo``) or lm-zoo (``merge_lm``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from compress.bench.merge_lm import markdown_lm, run_lm
from compress.bench.merge_zoo import LAMBDAS, QUICK, markdown_minilm, run_minilm, save
from compress.errors import CompressError
from compress.progress import console


def run(zoo_name: str, zoo_root: Path = Path("checkpoints/zoo"), results: Path = Path("checkpoints/bench"), *,
        device: str = "cpu", dev_limit: Optional[int] = 500, test_limit: Optional[int] = None, quiet: bool = False,
        lambdas=LAMBDAS, quick: bool = False) -> dict:
    zoo = zoo_root / zoo_name
    lambdas = QUICK["lambdas"] if quick and lambdas is LAMBDAS else lambdas  # an explicit grid wins
    if zoo_name == "minilm-8task":
        report = run_minilm(zoo, device=device, dev_limit=dev_limit, test_limit=test_limit, lambdas=lambdas,
                            quiet=quiet, quick=quick)
        md = markdown_minilm(report)
    elif zoo_name == "lm-zoo":
        report = run_lm(zoo, device=device, dev_limit=dev_limit, test_limit=test_limit, lambdas=lambdas,
                        quiet=quiet, quick=quick)
        md = markdown_lm(report)
    else:
        raise CompressError(f"bench merge runs on minilm-8task or lm-zoo, not '{zoo_name}'")
    paths = save(report, results, md)
    print(md)
    console.print(f"[bench merge] wrote {', '.join(str(p) for p in paths.values())}")
    return report
