"""Temporaries (issue 17, items 8 and 9): a rerun removes what a killed writer left (its pid, on this host, is
gone) and keeps a live writer's; SIGTERM cleans up and exits 143 with one line; a write that fails (a full disk,
here a real RLIMIT_FSIZE) is one line naming the output, with nothing left at the target and no temporary."""

import os
import re
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COMPRESS_QUIET": "1"}


def _cli(*args, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "compress.cli", *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _temps(folder: Path, target: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(f".{target}."))


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def _when_writing(proc: subprocess.Popen, folder: Path, target: str, nbytes: int = 8 * 2**20) -> list[Path]:
    """Wait until the temporaries of ``target`` hold ``nbytes``: the process is mid-write."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        temps = _temps(folder, target)
        try:
            if temps and sum(_size(t) for t in temps) >= nbytes:
                return temps
        except FileNotFoundError:
            pass
        assert proc.poll() is None, f"finished before it could be stopped: {proc.communicate()}"
        time.sleep(0.005)
    raise AssertionError("no temporary appeared")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """Two 64 MB checkpoints (16 float32 tensors of 1M): writing an output takes most of a second."""
    root = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(16)}
    save_file(base, str(root / "base.safetensors"))
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()},
              str(root / "ft.safetensors"))
    return root


def _interpolate(root: Path) -> list[str]:
    return ["interpolate", "--base", root / "base.safetensors", "--finetuned", root / "ft.safetensors",
            "--alpha", "0.5", "--quiet"]


def test_kill_9_orphans_are_removed_by_a_rerun_and_live_ones_kept(big):
    work = big / "kill"
    work.mkdir()
    proc = _cli(*_interpolate(big), "--out", work / "out", cwd=big)
    _when_writing(proc, work, "out")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    orphans = _temps(work, "out")
    assert len(orphans) == 1 and _size(orphans[0]) >= 8 * 2**20 and not (work / "out").exists()
    m = re.fullmatch(rf"\.out\.tmp-(\w+)-{proc.pid}-\w+", orphans[0].name)
    assert m, orphans[0].name
    host = m[1]
    # what must survive: a live writer's temporary (this test's own pid), another host's, another target's
    live = work / f".out.tmp-{host}-{os.getpid()}-live"
    other_host = work / f".out.tmp-elsewhere-{proc.pid}-x"
    other_target = work / f".out2.tmp-{host}-{proc.pid}-x"
    dead_old = work / f".out.old-{host}-{proc.pid}"  # a replaced output whose writer died before removing it
    for p in (live, other_host, other_target, dead_old):
        p.mkdir()
    code, _, err = run_cli(*_interpolate(big), "--out", work / "out")
    assert code == 0, err
    assert sorted(p.name for p in work.iterdir()) == sorted(["out", live.name, other_host.name, other_target.name])
    # a single-file output's orphans (the file and its data part) go the same way
    dead_file = work / f".out2.tmp-{host}-{proc.pid}-abc_1"
    for p in (dead_file, dead_file.with_name(dead_file.name + ".data")):
        p.write_bytes(b"half a file")
    code, _, err = run_cli("extract", "--base", big / "base.safetensors", "--finetuned", big / "ft.safetensors",
                           "--density", "0.01", "--out", work / "out2")
    assert code == 0, err
    assert sorted(p.name for p in work.iterdir()) == sorted(["out", "out2", live.name, other_host.name])
    got = load_file(str(work / "out" / "model.safetensors"))
    b, f = load_file(str(big / "base.safetensors")), load_file(str(big / "ft.safetensors"))
    assert sorted(got) == sorted(b)
    for name in b:
        torch.testing.assert_close(got[name], b[name] + 0.5 * (f[name] - b[name]))


def test_sigterm_cleans_up_and_exits_143(big):
    work = big / "term"
    work.mkdir()
    proc = _cli(*_interpolate(big), "--out", work / "out", cwd=big)
    _when_writing(proc, work, "out")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err.strip().splitlines() == ["error: terminated by SIGTERM; unfinished outputs are removed"]
    assert list(work.iterdir()) == []


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 256 KB base and fine-tuned checkpoint and their delta file."""
    root = tmp_path_factory.mktemp("small")
    g = torch.Generator().manual_seed(1)
    base = {f"layers.{i}.weight": torch.randn(64, 256, generator=g) for i in range(4)}
    save_file(base, str(root / "base.safetensors"))
    save_file({k: v + 0.01 for k, v in base.items()}, str(root / "ft.safetensors"))
    assert run_cli("extract", "--base", root / "base.safetensors", "--finetuned", root / "ft.safetensors",
                   "--out", root / "d.safetensors")[0] == 0
    return root


@contextmanager
def _file_size_limit(nbytes: int = 40_000):
    """A real failing write: past RLIMIT_FSIZE, write() fails with EFBIG (SIGXFSZ ignored), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize("command", ["apply", "extract", "merge", "interpolate"])
def test_failing_write_is_one_line_and_leaves_nothing(small, tmp_path, command):
    out = tmp_path / ("d.safetensors" if command == "extract" else "o")
    base, ft = small / "base.safetensors", small / "ft.safetensors"
    args = {"apply": ["apply", "--base", base, "--delta", small / "d.safetensors"],
            "extract": ["extract", "--base", base, "--finetuned", ft],
            "merge": ["merge", "--base", base, "--models", ft, ft, "--method", "ties"],
            "interpolate": ["interpolate", "--base", base, "--finetuned", ft, "--alpha", "0.5", "1"],
            }[command]
    with _file_size_limit():
        code, _, err = run_cli(*args, "--out", out)
    assert code == 2, err
    failed = out / "alpha-0.5" if command == "interpolate" else out  # several α: one folder each, inside OUT
    assert err.strip().splitlines() == [f"error: {failed}: cannot write the output (file too large); nothing was "
                                        "written"]
    assert list(tmp_path.iterdir()) == []  # not even OUT, made for the α folders


def test_outputs_get_the_modes_of_ordinary_files(tmp_path, llama_pair):
    """mkdtemp's private 0700 temporaries are not what a finished model folder should be: 0755 / 0644 here."""
    import stat

    base, ft = llama_pair
    old = os.umask(0o022)
    try:
        code, _, err = run_cli("extract", "--base", base, "--finetuned", ft, "--out", tmp_path / "d.safetensors")
        assert code == 0, err
        code, _, err = run_cli("apply", "--base", base, "--delta", tmp_path / "d.safetensors", "--out", tmp_path / "m")
        assert code == 0, err
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()} == {0o644}
