"""Ctrl-C (issue 17, item 5): any command stops with exit code 130 and one line on stderr, and leaves neither an
output nor a temporary beside it, so `compress merge … && next` does not go on after an interrupt."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import compress
from tests.conftest import run_cli, save_llama

# della on ~6M parameters takes about a second on one thread: long enough to interrupt mid-write
_MERGE = ["merge", "--method", "della", "--density", "0.5", "--shard-size", "1MB", "--quiet"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("sigint")
    kw = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, vocab_size=4096)
    return save_llama(root / "base", seed=0, **kw), save_llama(root / "ft", seed=1, **kw)


def _wait_for_temporary(folder: Path, done, timeout: float = 60.0) -> bool:
    """True once a `.out.tmp-*` folder exists in ``folder`` (the merge is writing); False if ``done()`` first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and not done():
        if any(folder.glob(".out.tmp-*")):
            return True
        time.sleep(0.005)
    return False


def _default_sigint():
    # a suite started in the background of a non-interactive shell inherits SIGINT ignored, and an ignored signal
    # stays ignored across exec (Python then installs no KeyboardInterrupt handler): the child gets the default
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler in this process for the test, whatever the suite inherited."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_sigint_to_a_merge_subprocess_exits_130_and_leaves_nothing(pair, tmp_path):
    base, ft = pair
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(compress.__file__).parents[1]), "OMP_NUM_THREADS": "1",
           "COMPRESS_QUIET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli", *_MERGE, "--base", str(base), "--models", str(ft),
                             "--out", str(work / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=_default_sigint)
    try:
        assert _wait_for_temporary(work, lambda: proc.poll() is not None), proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["interrupted"]
    assert "wrote" not in stdout
    assert list(work.iterdir()) == []  # neither the output nor its temporary


def test_keyboard_interrupt_inside_a_command_in_process_exits_130(pair, tmp_path, python_sigint):
    """The same through main() in this process: a real SIGINT, delivered while the merge writes its temporary."""
    base, ft = pair
    work = tmp_path / "work"
    work.mkdir()
    finished = threading.Event()
    sent = []

    def interrupt():
        if _wait_for_temporary(work, finished.is_set):
            sent.append(True)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    t = threading.Thread(target=interrupt, daemon=True)
    t.start()
    try:
        code, stdout, stderr = run_cli(*_MERGE, "--base", base, "--models", ft, "--out", work / "out")
    finally:
        finished.set()
        t.join()
    assert sent, "the merge finished before its temporary was seen"
    assert code == 130, stderr
    assert stderr.strip().splitlines() == ["interrupted"]
    assert "wrote" not in stdout
    assert list(work.iterdir()) == []
