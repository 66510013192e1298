"""`compress bench merge ZOO`: the merge benchmark on minilm-8task (``merge_zoo``) or lm-zoo (``merge_lm``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from compress.bench.merge_lm import markdown_lm, run_lm
from compress.bench.merge_zoo import LAMBDAS, MERGES, QUICK, markdown_minilm, run_minilm, save
from compress.errors import CompressError
from compress.progress import console

# what an earlier report must share for its rows to join this one's (``--rows``)
SAME_SETTINGS = ("zoo", "dev_limit", "test_limit", "lambdas", "device", "quick", "max_tokens", "seqlen")


def chosen_rows(rows: Optional[str]) -> Optional[dict]:
    """The merge rows a ``--rows`` list names (None: all of them); an unknown name is a one-line error."""
    if rows is None:
        return None
    names = [r.strip() for r in rows.split(",") if r.strip()]
    by_lower = {k.lower(): k for k in MERGES}
    unknown = [r for r in names if r.lower() not in by_lower]
    if unknown or not names:
        raise CompressError(f"--rows: unknown row {', '.join(repr(r) for r in unknown) or '(none given)'}; "
                            f"choose from {', '.join(MERGES)}")
    return {by_lower[r.lower()]: MERGES[by_lower[r.lower()]] for r in names}


def keep_earlier_rows(report: dict, earlier_path: Path) -> dict:
    """``report`` with the merge rows of the report saved at ``earlier_path`` that it did not run, when that report
    was measured with the same settings (``SAME_SETTINGS``); rows in ``MERGES`` order after the reference rows."""
    import json

    try:
        earlier = json.loads(earlier_path.read_text())
    except (OSError, ValueError):
        return report
    if not isinstance(earlier, dict) or not isinstance(earlier.get("rows"), dict):
        return report
    differ = [k for k in SAME_SETTINGS if earlier.get(k) != report.get(k)]
    if differ:
        console.print(f"[bench merge] {earlier_path}: measured with other {', '.join(differ)}; its rows are not kept")
        return report
    rows = {k: v for k, v in report["rows"].items() if k not in MERGES}
    for name in MERGES:
        row = report["rows"].get(name, earlier["rows"].get(name))
        if row is not None:
            rows[name] = row
    return {**report, "rows": rows}


def run(zoo_name: str, zoo_root: Path = Path("checkpoints/zoo"), results: Path = Path("checkpoints/bench"), *,
        device: str = "cpu", dev_limit: Optional[int] = 500, test_limit: Optional[int] = None, quiet: bool = False,
        lambdas=LAMBDAS, quick: bool = False, rows: Optional[str] = None, max_tokens: Optional[int] = None) -> dict:
    """``rows``: comma-separated merge rows to run (default all); the other rows of an earlier report in
    ``results`` with the same settings are kept, so a table may be measured over several calls. ``max_tokens``:
    lm-zoo's perplexity tokens per text (default ``run_lm``'s)."""
    merges = chosen_rows(rows)
    zoo = zoo_root / zoo_name
    lambdas = QUICK["lambdas"] if quick and lambdas is LAMBDAS else lambdas  # an explicit grid wins
    if zoo_name == "minilm-8task":
        report = run_minilm(zoo, device=device, dev_limit=dev_limit, test_limit=test_limit, lambdas=lambdas,
                            quiet=quiet, quick=quick, merges=merges)
        markdown = markdown_minilm
    elif zoo_name == "lm-zoo":
        report = run_lm(zoo, device=device, dev_limit=dev_limit, test_limit=test_limit, lambdas=lambdas,
                        quiet=quiet, quick=quick, merges=merges,
                        **({} if max_tokens is None else {"max_tokens": max_tokens}))
        markdown = markdown_lm
    else:
        raise CompressError(f"bench merge runs on minilm-8task or lm-zoo, not '{zoo_name}'")
    if merges is not None:
        report = keep_earlier_rows(report, results / f"merge_{report['zoo']}.json")
    md = markdown(report)
    paths = save(report, results, md)
    print(md)
    console.print(f"[bench merge] wrote {', '.join(str(p) for p in paths.values())}")
    return report
