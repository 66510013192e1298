"""Streaming I/O at disk speed (issue 19): the read-ahead is bounded in bytes and gives the tensors the plain
reader gives, in the same order; delta, sparse and LoRA files are written once (measured from /proc/self/io);
a failure mid-write leaves no output and no temporary; ``compress bench`` timings alternate A B A B."""

import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from compress.bench.timing import alternate, ratios, summary
from compress.config import MergeConfig, MergeModel
from compress.delta import SparseDelta, write_delta
from compress.errors import CompressError
from compress.io.lora import write_lora_adapter
from compress.io.prefetch import ReadAhead, walk
from compress.io.reader import open_checkpoint
from compress.io.sparse import header_room, write_sparse
from compress.merge.executor import Merger
from compress.merge.methods import task_vector_merge
from compress.sparsify.masks import seeded_generator
from tests.conftest import finetune_like, run_cli, save_llama

SIZES = [30, 50, 20, 70, 10, 40, 60, 5, 5, 90]


def _jobs(live: list, peak: list, lock: threading.Lock):
    """Jobs that count the bytes read and not yet done with (``live``), as the consumer sees them."""
    def read(i):
        def go():
            with lock:
                live[0] += SIZES[i]
                peak[0] = max(peak[0], live[0])
            return torch.full((SIZES[i],), i)
        return go
    return [(i, i, SIZES[i], read(i)) for i in range(len(SIZES))]


@pytest.mark.parametrize("budget", [0, 100, 10**6])
def test_read_ahead_stays_within_its_byte_budget_and_keeps_the_order(budget):
    live, peak, lock = [0], [0], threading.Lock()
    with ReadAhead(_jobs(live, peak, lock), budget, threads=4) as ahead:
        for i in range(len(SIZES)):
            t = ahead.take(i)
            assert t is not None and torch.equal(t, torch.full((SIZES[i],), i))
            assert ahead.take(i) is None  # taken once; a second read goes to the file
            with lock:
                live[0] -= SIZES[i]
            ahead.finish(i)
    # the tensor being computed counts: what is held never passes the budget by more than one read
    assert peak[0] <= max(budget, 0) + max(SIZES)
    assert ahead.peak_in_flight <= max(budget, 0) + max(SIZES)
    if budget == 0:
        assert peak[0] <= max(a + b for a, b in zip(SIZES, SIZES[1:]))  # the current tensor and the next
    if budget == 10**6:
        assert ahead.peak_in_flight == sum(SIZES)  # everything was read ahead


def test_a_read_the_consumer_skips_does_not_hold_the_budget():
    live, peak, lock = [0], [0], threading.Lock()
    with ReadAhead(_jobs(live, peak, lock), 100, threads=2) as ahead:
        for i in range(len(SIZES)):
            if i % 3 == 0:
                assert ahead.take(i) is not None
            ahead.finish(i)  # the others are dropped, not left holding bytes
            assert ahead.in_flight <= 100 + max(SIZES)
        assert ahead.in_flight == 0 and not ahead.held


@pytest.fixture(scope="module")
def three_models(tmp_path_factory):
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        root = tmp_path_factory.mktemp(str(dtype).removeprefix("torch."))
        base = save_llama(root / "base", seed=0, dtype=dtype)
        out[dtype] = [base] + [finetune_like(base, root / f"ft{i}", seed=i + 1, dtype=dtype) for i in range(2)]
    return out


def _reference(merger: Merger, paths) -> dict[str, torch.Tensor]:
    """The merge computed from tensors read one by one with the plain reader (no read-ahead, no reused buffer)."""
    base, *fts = (open_checkpoint(p) for p in paths)
    out = {}
    for name in base.names():
        b = base.get(name).float()
        stacked = torch.stack([ft.get(name).float() - b for ft in fts])
        n = len(fts)
        merged = task_vector_merge(
            stacked, [merger.param("weight", name, i) for i in range(n)], merger.method,
            density=[merger.param("density", name, i) for i in range(n)],
            gamma=[merger.param("gamma", name, i) for i in range(n)],
            epsilon=[merger.param("epsilon", name, i) for i in range(n)], lam=merger.param("lambda", name),
            keep=None, generator=seeded_generator(merger.cfg.seed, name), inplace=True, protect=None,
            protect_sparsity=None).add_(b)
        out[name] = merged.to(base.info(name).dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_merge_with_read_ahead_is_bit_identical_to_the_plain_reader(tmp_path, three_models, dtype, method):
    paths = three_models[dtype]
    params = {"density": 0.3} if method != "task_arithmetic" else {}
    cfg = MergeConfig(method=method, base=paths[0], topk="per_tensor",
                      models=[MergeModel(model=p, parameters={"weight": w, **params})
                              for p, w in zip(paths[1:], (1.0, 0.6))])
    want = _reference(Merger(cfg), paths)
    for budget in (1, None):  # one tensor at a time, and the default look-ahead
        merger = Merger(cfg)
        merger.read_ahead_bytes = budget
        got = list(merger.tensors(quiet=True))
        assert [n for n, _ in got] == list(want)  # the reference model's order
        for name, t in got:
            assert t.dtype == dtype and torch.equal(t.view(torch.uint8), want[name].view(torch.uint8)), name
        largest = max(open_checkpoint(paths[0]).info(n).nbytes for n in want)
        assert walk.last_peak <= (budget or 64 * 2**20) + largest


def _wchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def _bytes(path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def wide_pair(tmp_path_factory):
    """~1.5 MB of float32 per model: large enough that the few bytes others write do not blur the count."""
    root = tmp_path_factory.mktemp("wide")
    base = save_llama(root / "base", seed=0, hidden_size=128, intermediate_size=256, vocab_size=512)
    ft = finetune_like(base, root / "ft", seed=3)
    return base, ft


def _written_once(tmp_path, make) -> None:
    make(tmp_path / "warm")  # imports and first-use caches write files of their own
    start = _wchar()
    out = make(tmp_path / "out")
    wrote, size = _wchar() - start, _bytes(out)
    assert size <= wrote <= size + 4096, (wrote, size)


def test_extract_writes_each_byte_of_the_delta_file_once_and_it_round_trips(tmp_path, wide_pair):
    base, ft = wide_pair

    def make(out):
        code, stdout, err = run_cli("extract", "--base", base, "--finetuned", ft, "--density", "0.3",
                                    "--out", out / "d.safetensors", "--quiet")
        assert code == 0, err
        assert "GB/s read" in stdout
        return out / "d.safetensors"

    _written_once(tmp_path, make)
    code, stdout, err = run_cli("apply", "--base", base, "--delta", tmp_path / "out" / "d.safetensors", "--out",
                                tmp_path / "rec", "--quiet")
    assert code == 0 and "GB/s read" in stdout, err
    got, ft_sd, base_sd = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "rec", ft, base))
    for name, t in got.items():
        kept = t != base_sd[name]
        assert torch.equal(t[kept], ft_sd[name][kept]), name  # exact at every kept entry
    assert 0.25 < sum(int((got[n] != base_sd[n]).sum()) for n in got) / sum(t.numel() for t in got.values()) < 0.35


def test_the_sparse_file_is_written_once_behind_the_header_room_of_its_plan(tmp_path, wide_pair):
    base, _ = wide_pair
    pruned = tmp_path / "pruned"
    sd = load_file(str(base / "model.safetensors"))
    for name, t in sd.items():
        if t.dim() == 2:
            t[t.abs() < t.abs().median()] = 0
    pruned.mkdir()
    from safetensors.torch import save_file

    save_file(sd, str(pruned / "model.safetensors"), metadata={"format": "pt"})
    (pruned / "config.json").write_bytes((base / "config.json").read_bytes())
    _written_once(tmp_path, lambda out: write_sparse(pruned, out / "s.safetensors", quiet=True).path)
    path = tmp_path / "out" / "s.safetensors"
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = path.read_bytes()[8:8 + header_len]
    # the JSON, then spaces up to the room sized from the names, shapes and dtypes before any tensor was encoded
    meta = json.loads(header)["__metadata__"]
    with open_checkpoint(pruned) as ck:
        plan = [(n, ck.info(n).shape, ck.info(n).dtype) for n in ck.names()]
    room = header_room(plan, ["config.json"], {k: v for k, v in meta.items() if k != "tensors"})
    assert header_len == -(-room // 8) * 8 and header.rstrip(b" ") == header.strip()
    code, _, err = run_cli("apply", "--delta", path, "--out", tmp_path / "dense", "--quiet")
    assert code == 0, err
    back = load_file(str(tmp_path / "dense" / "model.safetensors"))
    assert all(torch.equal(back[n], sd[n]) for n in sd)


def test_the_lora_adapter_is_written_once(tmp_path, wide_pair):
    base, ft = wide_pair

    def make(out):
        code, _, err = run_cli("extract-lora", "--base", base, "--finetuned", ft, "--rank", "4", "--out", out / "a",
                               "--quiet")
        assert code == 0, err
        return out / "a"

    _written_once(tmp_path, make)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "out" / "a")
    assert model.peft_config["default"].r == 4


def test_a_failure_mid_write_leaves_no_output_and_no_temporary(tmp_path, wide_pair):
    base, ft = wide_pair
    ck_b, ck_f = open_checkpoint(base), open_checkpoint(ft)
    names = ck_b.names()

    def deltas():
        for i, n in enumerate(names):
            if i == 5:
                raise CompressError(f"boom at '{n}'")
            b = ck_b.get(n)
            yield SparseDelta(n, b, ck_f.get(n) - b, torch.ones_like(b, dtype=torch.bool), b.dtype)

    out = tmp_path / "w"
    out.mkdir()
    with pytest.raises(CompressError, match="boom at"):
        write_delta(out / "d.safetensors", deltas(), metadata={},
                    plan=[(n, tuple(ck_b.info(n).shape), False) for n in names])
    with pytest.raises(CompressError, match="boom at"):
        write_lora_adapter(((n, d.delta) for n, d in zip(names, deltas())), out / "a", 4, "x", progress=False,
                           shapes={n: tuple(ck_b.info(n).shape) for n in names})
    sd = load_file(str(base / "model.safetensors"))
    sd[names[-1]][0] = float("nan")
    bad = tmp_path / "bad"
    bad.mkdir()
    from safetensors.torch import save_file

    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CompressError, match=f"tensor '{names[-1]}' contains NaN or Inf"):
        write_sparse(bad, out / "s.safetensors", quiet=True)
    assert list(out.iterdir()) == []  # no output, no temporary, no side file


def test_alternate_runs_the_contenders_in_turn_and_pairs_the_rounds():
    order = []

    def run(key, seconds):
        def go(i):
            order.append((key, i))
            return {"seconds": seconds[i], "peak_rss_bytes": 100 + i}
        return go

    got = alternate({"a": run("a", [2.0, 4.0, 3.0]), "b": run("b", [1.0, 1.0, 3.0])}, rounds=3,
                    before=lambda k, i: order.append(("before", k)))
    assert order == [("before", "a"), ("a", 0), ("before", "b"), ("b", 0), ("before", "a"), ("a", 1),
                     ("before", "b"), ("b", 1), ("before", "a"), ("a", 2), ("before", "b"), ("b", 2)]
    r = ratios(got["b"], got["a"])
    assert r["values"] == [0.5, 0.25, 1.0] and r["median"] == 0.5 and r["min"] == 0.25 and r["max"] == 1.0
    assert summary(got["a"]) == {"seconds": {"median": 3.0, "min": 2.0, "max": 4.0, "values": [2.0, 4.0, 3.0]},
                                 "peak_rss_bytes": 102}
    with pytest.raises(ValueError, match="paired one to one"):
        ratios(got["a"], got["b"][:2])


# -- zero-copy reads, direct writes, the fused task arithmetic -------------------------------------------------

def _maps_of(path) -> int:
    """How many of this process's mappings are of ``path`` (read from /proc/self/maps)."""
    real = str(path.resolve())
    with open("/proc/self/maps") as f:
        return sum(line.rstrip("\n").endswith(real) for line in f)


def test_a_read_is_a_private_mapping_that_leaves_the_file_alone_and_goes_when_freed(tmp_path):
    import gc

    from safetensors.torch import save_file

    ref = {"a": torch.arange(5000, dtype=torch.float32), "b": torch.randn(300, 7).to(torch.bfloat16)}
    path = tmp_path / "m.safetensors"
    save_file(ref, path)
    before = path.read_bytes()
    ck = open_checkpoint(path)
    a = ck.get("a")
    assert _maps_of(path) == 1 and torch.equal(a, ref["a"])
    a.mul_(-2)  # copy-on-write: the tensor changes, the file and a second read do not
    assert torch.equal(a, -2 * ref["a"]) and torch.equal(ck.get("a"), ref["a"]) and path.read_bytes() == before
    assert torch.equal(ck.get("b"), ref["b"])
    del a
    gc.collect()
    deadline = __import__("time").monotonic() + 5  # munmap runs on the unmapping thread
    while _maps_of(path) and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.01)
    assert _maps_of(path) == 0


def test_unaligned_tensor_bytes_and_mapping_off_are_read_by_preadv_to_the_same_values(tmp_path, monkeypatch):
    """A header whose length is odd puts every tensor at an odd offset: a bf16 view would be misaligned, so the
    reader falls back to a positioned read (the format does not require the 8-byte padding writers add)."""
    import json
    import struct

    import compress.io.mapped as mapped

    t = torch.randn(64, 33).to(torch.bfloat16)
    head = json.dumps({"w": {"dtype": "BF16", "shape": [64, 33], "data_offsets": [0, t.numel() * 2]}}).encode()
    head += b" " * (1 - len(head) % 2)  # odd length
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + t.view(torch.uint8).numpy().tobytes())
    assert torch.equal(open_checkpoint(path).get("w"), t) and _maps_of(path) == 0
    monkeypatch.setattr(mapped, "ENABLED", False)
    even = tmp_path / "even.safetensors"
    from safetensors.torch import save_file

    save_file({"w": t}, even)
    assert torch.equal(open_checkpoint(even).get("w"), t) and _maps_of(even) == 0


def _stream(path, tensors, **kw):
    from compress.io.writer import SafetensorsStreamWriter, header_room

    w = SafetensorsStreamWriter(path, reserve=header_room([(n, t.shape) for n, t in tensors]), **kw)
    return w


def _written(path, tensors) -> bytes:
    """The bytes of a file the stream writer makes of ``tensors``."""
    w = _stream(path, tensors)
    for n, t in tensors:
        w.add(n, t)
    w.close()
    return path.read_bytes()


@pytest.mark.parametrize("folder", ["tmp", "shm"])
def test_direct_writes_give_the_bytes_of_buffered_ones_and_two_open_files_do_not_mix(tmp_path, monkeypatch,
                                                                                     folder):
    """Past DIRECT_AFTER a shard goes through O_DIRECT in staged chunks (made tiny here so that the head, many
    full chunks and an unaligned tail all occur); two files open at once on one thread (a model folder and its
    sparse file, as ``write_folder(also=...)`` does) each get their own staging buffer. On a file system without
    O_DIRECT (tmpfs) the same bytes come out buffered."""
    import os
    from pathlib import Path

    import compress.io.writer as writer

    root = tmp_path if folder == "tmp" else Path("/dev/shm")
    if not root.is_dir():
        pytest.skip("no /dev/shm here")
    root = Path(__import__("tempfile").mkdtemp(dir=root))
    try:
        monkeypatch.setattr(writer, "DIRECT_AFTER", 3 * 4096 + 100)
        monkeypatch.setattr(writer, "DIRECT_STAGE", 2 * 4096)
        g = torch.Generator().manual_seed(0)
        tensors = [(f"t{i}", torch.randn(int(n), generator=g).to(torch.bfloat16))
                   for i, n in enumerate([10, 5000, 3, 7001, 4096, 1, 12345])]
        opened = []
        real = writer._DirectSink.__init__

        def spy(self, fd, start, buffered):
            opened.append(start)
            real(self, fd, start, buffered)

        monkeypatch.setattr(writer._DirectSink, "__init__", spy)
        monkeypatch.setenv("COMPRESS_DIRECT_WRITES", "1")
        a, b = _stream(root / "a.safetensors", tensors), _stream(root / "b.safetensors", tensors[::-1])
        for (na, ta), (nb, tb) in zip(tensors, tensors[::-1]):
            a.add(na, ta)
            b.add(nb, tb)
        a.close()
        b.close()
        monkeypatch.setenv("COMPRESS_DIRECT_WRITES", "0")
        assert (root / "a.safetensors").read_bytes() == _written(root / "c.safetensors", tensors)
        got = load_file(root / "b.safetensors")
        assert all(torch.equal(got[n], t) for n, t in tensors)
        direct = True
        try:
            os.close(os.open(root / "c.safetensors", os.O_WRONLY | os.O_DIRECT))
        except OSError:
            direct = False
        assert len(opened) == (2 if direct else 0), opened  # a and b went direct where the file system allows
        assert all(s % writer.DIRECT_ALIGN == 0 for s in opened)
    finally:
        __import__("shutil").rmtree(root, ignore_errors=True)


def test_fused_task_arithmetic_is_the_stacked_torch_path_bit_for_bit():
    """``task_arithmetic2`` against ``combine`` over the stacked deltas plus the base (the path it replaces, which
    the mergekit-reference tests pin to mergekit's own output): weights rounded to bf16 as the torch path's
    tensor of weights is, an unrounded λ, values spanning 60 octaves, and overflow reported as not finite."""
    from compress.merge.methods import combine, task_arithmetic2

    g = torch.Generator().manual_seed(0)
    n = 1 << 15
    base = (torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g).float()))
    base = base.to(torch.bfloat16)
    xs = [(base.float() + torch.randn(n, generator=g) * 1e-2).to(torch.bfloat16) for _ in range(2)]
    xs[1][::9] = base[::9]  # unchanged entries
    for w in ([0.6, 0.4], [1.0, -0.3], [0.0, 2.0]):
        for lam in (1.0, 0.7, 1.9):
            got = task_arithmetic2(base, xs[0], xs[1], *w, lam=lam, threads=2)
            ref = combine(torch.stack([xs[0] - base, xs[1] - base]), w, lam=lam, native=False).add_(base)
            if got is None:  # no C compiler here: nothing to compare
                assert __import__("shutil").which("cc") is None
                return
            assert got[1] and torch.equal(got[0].view(torch.int16), ref.view(torch.int16)), (w, lam)
    big = torch.full((n,), 3e38).to(torch.bfloat16)
    merged, finite = task_arithmetic2(big, -big, big, 1.0, 1.0, lam=1.0)
    assert not finite and not bool(merged.isfinite().all())
    assert task_arithmetic2(base, xs[0], xs[1][:-1], 1, 1) is None and task_arithmetic2(
        base.float(), xs[0].float(), xs[1].float(), 1, 1) is None


def test_a_task_arithmetic_merge_through_the_fused_pass_writes_the_torch_paths_file(tmp_path, three_models,
                                                                                   monkeypatch):
    """End to end: a mergekit task-arithmetic recipe of two bf16 models (what ``bench merge-speed`` times)
    writes the same safetensors bytes with the fused pass as with it turned off."""
    import compress.merge.executor as executor

    base, ft1, ft2 = three_models[torch.bfloat16]
    cfg = dict(method="task_arithmetic", variant="mergekit", base=base, dtype="bfloat16",
               parameters={"lambda": 0.9},
               models=[MergeModel(model=ft1, parameters={"weight": 0.6}),
                       MergeModel(model=ft2, parameters={"weight": 0.4})])
    calls = []
    real = executor.task_arithmetic2

    def fused(*a, **k):
        out = real(*a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(executor, "task_arithmetic2", fused)
    Merger(MergeConfig(**cfg)).write(tmp_path / "fused", quiet=True)
    monkeypatch.setattr(executor, "task_arithmetic2", lambda *a, **k: None)
    Merger(MergeConfig(**cfg)).write(tmp_path / "torch", quiet=True)
    assert any(calls) or __import__("shutil").which("cc") is None
    assert (tmp_path / "fused/model.safetensors").read_bytes() == (tmp_path / "torch/model.safetensors").read_bytes()


def test_a_file_system_that_opens_but_refuses_direct_writes_gets_the_same_file_buffered(tmp_path, monkeypatch):
    import errno

    import compress.io.writer as writer

    monkeypatch.setattr(writer, "DIRECT_AFTER", 4096)
    monkeypatch.setattr(writer, "DIRECT_STAGE", 4096)
    tensors = [(f"t{i}", torch.full((3000 + i,), float(i), dtype=torch.bfloat16)) for i in range(4)]

    def write(name):
        return _written(tmp_path / name, tensors)

    monkeypatch.setenv("COMPRESS_DIRECT_WRITES", "0")
    plain = write("plain.safetensors")
    monkeypatch.delenv("COMPRESS_DIRECT_WRITES")
    refused = []

    def pwrite(*a):
        refused.append(1)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(writer.os, "pwrite", pwrite)
    assert write("refused.safetensors") == plain
    import os

    try:
        os.close(os.open(tmp_path / "plain.safetensors", os.O_WRONLY | os.O_DIRECT))
        assert refused == [1]  # tried once, then buffered for good
    except OSError:
        assert not refused  # no O_DIRECT here at all


@pytest.mark.parametrize("faster", [True, False, "flips"])
def test_the_writer_keeps_measuring_both_ways_runs_the_faster_and_writes_the_same_bytes(tmp_path, monkeypatch,
                                                                                       faster):
    """With COMPRESS_DIRECT_WRITES unset a large file is written buffered (the head), one stage direct, then in
    runs of the faster way (here decided by a stub) that double while the winner holds, each followed by one stage
    of the other way, measured again; a later file starts with the winner. Whatever the switches, the file is
    byte for byte the buffered one."""
    import os

    import compress.io.writer as writer

    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError:
        pytest.skip("this file system has no O_DIRECT")
    stage = 4096
    monkeypatch.setattr(writer, "DIRECT_AFTER", 2 * stage)
    monkeypatch.setattr(writer, "DIRECT_STAGE", stage)
    monkeypatch.setattr(writer, "PROBE_FIRST", 2)
    monkeypatch.setattr(writer, "PROBE_MOST", 8)
    monkeypatch.setattr(writer, "_rates", {})
    monkeypatch.setattr(writer, "_direct_choice", None)
    monkeypatch.delenv("COMPRESS_DIRECT_WRITES", raising=False)
    decisions = []

    def prefer(d, b):
        assert d > 0 and b > 0
        decisions.append(faster if faster != "flips" else len(decisions) % 4 < 2)
        return decisions[-1]

    monkeypatch.setattr(writer, "_prefer_direct", prefer)
    runs = []
    real = writer._measured
    monkeypatch.setattr(writer, "_measured", lambda way, n, s: runs.append((way, n)) or real(way, n, s))
    tensors = [(f"t{i}", torch.full((1000 + 997 * i,), float(i), dtype=torch.bfloat16)) for i in range(12)]

    def write(name):
        return _written(tmp_path / name, tensors)

    measured = write("measured.safetensors")
    assert runs[0][0] is False and runs[1] == (True, stage)  # the head, buffered; one stage direct
    # every measured run is either one stage (a measurement) or a run of the faster way of 2, 4, 8, 8 … stages
    lengths = [n // stage for _, n in runs[1:]]
    assert all(k == 1 or k in (2, 4, 8) for k in lengths), lengths
    if faster != "flips":
        assert [w for w, _ in runs[1:]] == [True] + [faster, not faster] * ((len(runs) - 2) // 2) + \
            [faster] * (len(runs) % 2), runs
        assert lengths[1::2] == [2, 4, 8, 8, 8][:len(lengths[1::2])], lengths
        assert writer._direct_choice is faster
    else:
        assert len(set(w for w, k in zip([w for w, _ in runs[1:]], lengths) if k > 1)) == 2  # both ways ran
    n_runs = len(runs)
    again = write("again.safetensors")
    assert runs[n_runs][0] is False and runs[n_runs + 1][1] // stage > 1  # the head, then the winner runs
    monkeypatch.setenv("COMPRESS_DIRECT_WRITES", "0")
    assert measured == again == write("buffered.safetensors")


def test_a_forked_child_unmaps_what_it_frees(tmp_path):
    """The unmapping thread is not copied by fork: a child starts its own, so its freed tensors do not stay
    mapped (a serving worker that reads tensors would otherwise grow without bound)."""
    import gc
    import os
    import time

    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.arange(10000.0)}, path)
    ck = open_checkpoint(path)
    t = ck.get("a")
    del t
    gc.collect()  # this process's unmapping thread has started
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child reports through its exit status)
        ok = False
        try:
            t = ck.get("a")
            ok = float(t.sum()) == 49995000.0
            del t
            gc.collect()
            deadline = time.monotonic() + 5
            while _maps_of(path) and time.monotonic() < deadline:
                time.sleep(0.01)
            ok = ok and _maps_of(path) == 0
        finally:
            os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
