"""Files a user points at never run code, and bad files are clear errors (issue 11).

Every file kind the package reads (checkpoint, CIFAR batch,
mini-ImageNet pickle, the run dirs `blip compare --out DIR` resumes on its own) gets a
``__reduce__`` payload that would create a marker file; the payload must not run and
the error must name the file. Then: checksums, malformed checkpoints, stale temp
files, disk full, results.json never ahead of its checkpoint.
The RL checkpoint's env payload: tests/rl/test_rl_safety.py.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import blip.runs.checkpoint as ckpt
from blip import cli
from blip.classification.data import DataFormatError, load_benchmark
from blip.classification.data.formats import read_cifar_batch
from blip.classification.trainer import TrainConfig, Trainer
from blip.runs.safeload import CheckpointError, RestrictedUnpickler, from_plain, to_plain

ROOT = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this creates ``marker`` (a stand-in for ``os.system(...)``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _cfg(**kw) -> TrainConfig:  # noqa: ANN003
    return TrainConfig.from_preset("pdigits", n_tasks=2, epochs=1, **kw)


def _train(out: Path, **kw) -> dict:  # noqa: ANN003
    return Trainer(_cfg(**kw), out, quiet=True, plots=False).run()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-task pdigits run (copied by tests that change it)."""
    out = tmp_path_factory.mktemp("safety") / "run"
    _train(out)
    return out


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    return d


# -- payloads in every file kind ---------------------------------------------------------


def test_checkpoint_payload_does_not_run(run_dir: Path, tmp_path: Path) -> None:
    d, marker = _copy(run_dir, tmp_path), tmp_path / "pwned"
    # an older blip's format (a bare torch.save) and ours (checksummed, but a pickle inside)
    torch.save({"task": 0, "model": Payload(marker)}, d / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint\.pt.*--trust-pickles"):
        Trainer(_cfg(), d, quiet=True, plots=False).run(resume=True)
    buf = io.BytesIO()
    torch.save({"task": 0, "model": Payload(marker)}, buf)
    payload = buf.getvalue()
    import hashlib

    header = json.dumps({"format": 2, "bytes": len(payload),
                         "sha256": hashlib.sha256(payload).hexdigest()}).encode()
    (d / "checkpoint.pt").write_bytes(b"BLIP-CHECKPOINT\n" + header + b"\n" + payload)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt"):
        Trainer(_cfg(), d, quiet=True, plots=False).run(resume=True)
    assert not marker.exists()


def _cifar_batch(path: Path, data: object, labels: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump({b"data": data, b"labels": labels}, f, protocol=2)


def test_cifar_batch_payload_does_not_run_unless_trusted(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    marker = tmp_path / "pwned"
    _cifar_batch(d / "data_batch_1", Payload(marker), [0])
    with pytest.raises(DataFormatError, match=r"data_batch_1.*refusing.*exec"):
        load_benchmark("cifar-alt", tmp_path)
    assert not marker.exists()
    with pytest.raises(DataFormatError):  # the opt-out really unpickles (then fails the format)
        read_cifar_batch(d / "data_batch_1", trust_pickles=True)
    assert marker.exists()


def test_restricted_unpickler_reads_real_batches(tmp_path: Path) -> None:
    rng = np.random.RandomState(0)
    x = rng.randint(0, 256, (5, 3072)).astype(np.uint8)
    for proto in (2, 4, 5):  # py2-era batches are protocol 2 (_codecs.encode for bytes)
        p = tmp_path / f"batch{proto}"
        with p.open("wb") as f:
            pickle.dump({b"data": x, b"labels": [1, 2, 3, 4, np.int64(5)],
                         b"batch_label": b"x"}, f, protocol=proto)
        xr, yr = read_cifar_batch(p)
        assert np.array_equal(xr.reshape(5, -1), x) and yr.tolist() == [1, 2, 3, 4, 5]
    # object arrays would unpickle arbitrary items: refused
    buf = io.BytesIO()
    pickle.dump(np.array([1, "a"], dtype=object), buf)
    with pytest.raises(pickle.UnpicklingError, match="object"):
        RestrictedUnpickler(io.BytesIO(buf.getvalue())).load()


def test_miniimagenet_payload_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    d = tmp_path / "miniimagenet"
    d.mkdir()
    for name in ("train.pkl", "test.pkl"):
        with (d / name).open("wb") as f:
            pickle.dump({"images": Payload(marker), "labels": [0]}, f)
    with pytest.raises(DataFormatError, match=r"train\.pkl.*refusing"):
        load_benchmark("miniimagenet", tmp_path)
    assert not marker.exists()


def test_compare_auto_resume_payload_does_not_run(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out, marker = tmp_path / "cmp", tmp_path / "pwned"
    argv = ["compare", "--benchmark", "pdigits", "--methods", "finetune", "--seeds", "0",
            "--epochs", "1", "--n-tasks", "2", "--no-plots", "--out", str(out)]
    assert cli.main(argv) == 0
    run = out / "pdigits-finetune-seed0"
    r = json.loads((run / "results.json").read_text())
    r["complete"] = False  # compare now resumes it from its checkpoint, unasked
    (run / "results.json").write_text(json.dumps(r))
    torch.save({"task": 0, "config": r["config"], "model": Payload(marker)},
               run / "checkpoint.pt")
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert str(run / "checkpoint.pt") in err and "--trust-pickles" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not marker.exists()


# -- old checkpoints -----------------------------------------------------------------------


def test_old_checkpoint_needs_trust_then_resumes(run_dir: Path, tmp_path: Path) -> None:
    class Killed(Exception):
        pass

    class DiesBeforeTask1(Trainer):
        def train_task(self, net, method, task, t):  # noqa: ANN001, ANN202
            if t == 1:
                raise Killed
            return super().train_task(net, method, task, t)

    d = tmp_path / "run"
    with pytest.raises(Killed):
        DiesBeforeTask1(_cfg(), d, quiet=True, plots=False).run()
    c = ckpt.load(d / "checkpoint.pt")
    assert c["task"] == 0 and isinstance(c["rng"]["numpy"][1], np.ndarray)
    torch.save(c, d / "checkpoint.pt")  # the pre-checksum format: numpy state pickled
    with pytest.raises(CheckpointError, match="older blip.*--trust-pickles"):
        Trainer(_cfg(), d, quiet=True, plots=False).run(resume=True)
    res = Trainer(_cfg(trust_pickles=True), d, quiet=True, plots=False).run(resume=True)
    full = json.loads((run_dir / "results.json").read_text())
    assert res["complete"] and res["acc_matrix"] == full["acc_matrix"]


# -- checksums and malformed checkpoints -------------------------------------------------


def test_flipped_byte_is_detected(run_dir: Path, tmp_path: Path) -> None:
    d = _copy(run_dir, tmp_path)
    raw = bytearray((d / "checkpoint.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit inside the weights
    (d / "checkpoint.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is corrupt.*checksum"):
        ckpt.load(d / "checkpoint.pt")


@pytest.mark.parametrize("content", ["random", "empty-dict", "plain-empty-dict", "truncated",
                                     "huge-bytes"])
def test_malformed_checkpoint_is_one_line_error(run_dir: Path, tmp_path: Path, capsys,  # noqa: ANN001
                                                content: str) -> None:
    d = _copy(run_dir, tmp_path)
    p = d / "checkpoint.pt"
    if content == "random":
        p.write_bytes(np.random.RandomState(0).bytes(4096))
    elif content == "empty-dict":
        ckpt.save_atomic({}, p)
    elif content == "plain-empty-dict":
        torch.save({}, p)
    elif content == "huge-bytes":  # int(1e999): OverflowError before
        p.write_bytes(b'BLIP-CHECKPOINT\n{"format": 2, "bytes": 1e999, "sha256": "0"}\nxx')
    else:
        p.write_bytes(p.read_bytes()[:1000])
    rc = cli.main(["train", "--benchmark", "pdigits", "--n-tasks", "2", "--epochs", "1",
                   "--quiet", "--no-plots", "--out", str(d), "--resume"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(p) in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_plain_codec_round_trips_numpy() -> None:
    state = {"numpy": np.random.get_state(), "a": np.arange(6, dtype=np.int16).reshape(2, 3),
             "s": np.float32(1.5), "t": (1, [2.0, None], "x", b"y"), "w": torch.ones(2)}
    buf = io.BytesIO()
    torch.save(to_plain(state), buf)
    back = from_plain(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert back["a"].dtype == np.int16 and np.array_equal(back["a"], state["a"])
    assert back["s"] == np.float32(1.5) and back["t"] == state["t"]
    with pytest.raises(TypeError, match="plain"):
        to_plain({"x": object()})


# -- writes: stale temps, disk full, order -------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)  # that process has exited (and pids are not reused at once)


def test_stale_temp_files_are_removed_on_next_write(tmp_path: Path) -> None:
    stale = [tmp_path / ".checkpoint.pt.k1ll3d.tmp",  # an older blip's (no pid)
             tmp_path / f".checkpoint.pt.p{_dead_pid()}.x1y2z3.tmp"]  # its writer is gone
    for s in stale:
        s.write_bytes(b"\0" * 100)
    others = [tmp_path / ".results.json.abc.tmp",  # another file's temp: not ours to remove
              tmp_path / ".checkpoint.pt.bak.p1.abc.tmp",  # nor checkpoint.pt.bak's
              # a live writer's (this process: e.g. another thread writing the same file)
              tmp_path / f".checkpoint.pt.p{os.getpid()}.live12.tmp"]
    for o in others:
        o.write_text("{")
    ckpt.save_atomic({"a": 1}, tmp_path / "checkpoint.pt")
    assert not any(s.exists() for s in stale) and all(o.exists() for o in others)
    assert ckpt.load(tmp_path / "checkpoint.pt")["a"] == 1


def test_live_writers_temp_survives_another_process_write(tmp_path: Path) -> None:
    # a writer in another live process (here: blocked until we let it finish)
    script = textwrap.dedent("""
        import sys, blip.runs.checkpoint as ckpt
        def slow(f, data):
            f.write(data); print("writing", flush=True); sys.stdin.readline()
        ckpt._write_bytes = slow
        ckpt.write_text_atomic(sys.argv[1], "x")
    """)
    target = tmp_path / "results.json"
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": ""})
    try:
        assert proc.stdout.readline().strip() == "writing"
        temps = list(tmp_path.glob(".results.json.*.tmp"))
        assert len(temps) == 1
        ckpt.write_text_atomic(target, "y")  # must not delete the other writer's temp
        assert temps[0].exists()
    finally:
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0 and target.read_text() == "x"


def test_atomic_writes_get_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        ckpt.write_text_atomic(tmp_path / "results.json", "{}")
        ckpt.save_atomic({"a": 1}, tmp_path / "checkpoint.pt")
        os.umask(0o077)
        ckpt.write_text_atomic(tmp_path / "private.csv", "a")
    finally:
        os.umask(old)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644  # as a PNG gets
    assert (tmp_path / "checkpoint.pt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.csv").stat().st_mode & 0o777 == 0o600


def _temp_name(f) -> str:  # noqa: ANN001 - the temp file an atomic write is filling
    return os.readlink(f"/proc/self/fd/{f.fileno()}")


def test_disk_full_is_one_line_error_and_files_agree(tmp_path: Path, capsys,  # noqa: ANN001
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real, files = ckpt._write_bytes, []

    def full_on_second(f, data: bytes) -> None:  # noqa: ANN001
        if ".checkpoint.pt." in _temp_name(f) and f not in files:  # text files come here too
            files.append(f)
        if len(files) == 2:  # the checkpoint after task 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(ckpt, "_write_bytes", full_on_second)
    out = tmp_path / "run"
    rc = cli.main(["train", "--benchmark", "pdigits", "--n-tasks", "3", "--epochs", "1",
                   "--quiet", "--no-plots", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "No space left on device" in err and str(out / "checkpoint.pt") in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    # the previous checkpoint is intact and results.json describes the same task
    assert ckpt.load(out / "checkpoint.pt")["task"] == 0
    assert json.loads((out / "results.json").read_text())["tasks_done"] == 1
    assert not list(out.glob(".*.tmp"))


# -- numpy builds nothing while a data pickle is read (review of issue 11) -----------------
#
# Each file is crafted opcode by opcode (pickle.dumps cannot write these) and read in a
# subprocess, so a crash (the out-of-bounds read was a SIGSEGV) fails the test.


def _op_str(s: str) -> bytes:  # BINUNICODE
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _op_bytes(b: bytes) -> bytes:  # SHORT_BINBYTES / BINBYTES
    return (b"C" + bytes([len(b)]) if len(b) < 256 else b"B" + struct.pack("<I", len(b))) + b


def _op_int(i: int) -> bytes:  # BININT
    return b"J" + struct.pack("<i", i)


def _dtype_op(typestr: str, memo: int | None = None) -> bytes:
    """numpy.dtype(typestr, False, True), optionally memoized at ``memo``."""
    p = b"cnumpy\ndtype\n" + _op_str(typestr) + b"\x89\x88\x87R"
    return p + (b"q" + bytes([memo]) if memo is not None else b"")


def _dtype_state(order: str = "|", elsize: int = -1, flags: int = 0) -> bytes:
    return (b"(K\x03" + _op_str(order) + b"NNN" + _op_int(elsize) + _op_int(-1)
            + _op_int(flags) + b"t")


def _array_op(shape: tuple[int, ...], dtype: bytes, raw: bytes = b"",
              raw_op: bytes | None = None) -> bytes:
    """_reconstruct(ndarray, (0,), b'b') then BUILD (1, shape, dtype, False, raw); the
    raw data as ``raw_op`` (opcodes) if given."""
    p = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _op_bytes(b"b")
    p += b"\x87R(K\x01(" + b"".join(_op_int(n) for n in shape) + b"t" + dtype + b"\x89"
    return p + (_op_bytes(raw) if raw_op is None else raw_op) + b"tb"


def _batch(data: bytes, prefix: bytes = b"") -> bytes:
    """{b'data': <data>, b'labels': [1]} at protocol 2 (``prefix`` runs first)."""
    return (b"\x80\x02" + prefix + b"}" + _op_bytes(b"data") + data + b"s"
            + _op_bytes(b"labels") + b"]K\x01as.")


def _crafted(kind: str) -> bytes:
    u1 = _dtype_op("u1") + _dtype_state() + b"b"
    if kind == "oob-shared-dtype":
        # an array built on a memoized dtype, then a second BUILD grows the dtype's item
        # size under the array: numpy then reads 2**26 bytes per item (SIGSEGV before)
        pre = _dtype_op("u1", memo=1) + _dtype_state() + b"b0"
        data = _array_op((2,), b"h\x01", b"AA")
        return _batch(b"]" + data + b"a", pre)[:-2] + b"h\x01" + _dtype_state(
            elsize=1 << 26) + b"b0s."
    if kind == "oob-void":  # the reviewer's form: a V8 dtype
        pre = _dtype_op("V8", memo=1) + _dtype_state(elsize=8) + b"b0"
        return _batch(_array_op((2,), b"h\x01", b"A" * 16), pre)
    if kind == "dtype-flags":  # flags claiming Python objects (hasobject) on a numeric dtype
        return _batch(_array_op((1, 3072), _dtype_op("u1") + _dtype_state(flags=0x3F) + b"b",
                                b"A" * 3072))
    if kind == "object-reconstruct":  # _reconstruct(ndarray, (3,), 'O'): an object array
        return _batch(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x03\x85"
                      + _op_str("O") + b"\x87R")
    if kind == "object-ndarray":  # ndarray((3,), 'O')
        return _batch(b"cnumpy\nndarray\nK\x03\x85" + _op_str("O") + b"\x86R")
    if kind == "object-state":  # a numeric-looking array whose state holds an object dtype
        return _batch(_array_op((2,), _dtype_op("O8") + _dtype_state() + b"b", b"x" * 16))
    if kind == "shape-bomb":  # 30 GB from a ~150-byte file
        return _batch(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
                      + _op_int(10_000_000) + _op_int(3072) + b"\x86" + _op_str("u1")
                      + b"\x87R")
    if kind == "size-mismatch":  # a shape the data cannot fill
        return _batch(_array_op((100, 3072), u1, b"A" * 16))
    if kind == "memo-amplified":  # one 64 KiB bytes object behind 100 arrays
        raw = b"B" + struct.pack("<I", 65536) + b"\0" * 65536 + b"q\x02"  # memo 2
        first = _array_op((65536,), u1, raw_op=raw)
        more = _array_op((65536,), u1, raw_op=b"h\x02")
        return _batch(b"]" + first + b"a" + (more + b"a") * 99)
    raise AssertionError(kind)


CRAFTED = ["oob-shared-dtype", "oob-void", "dtype-flags", "object-reconstruct",
           "object-ndarray", "object-state", "shape-bomb", "size-mismatch", "memo-amplified"]


@pytest.mark.parametrize("kind", CRAFTED)
def test_crafted_numpy_pickle_is_a_clear_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(_crafted(kind))
    script = textwrap.dedent(f"""
        from blip.classification.data.formats import read_cifar_batch
        try:
            x, y = read_cifar_batch({str(path)!r})
        except Exception as e:
            print("ERROR:", type(e).__name__, e)
        else:
            print("NO ERROR", x.shape, x.dtype)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    out = proc.stdout.strip()
    assert out.startswith("ERROR: DataFormatError") and str(path) in out, out
    assert "refusing" in out and len(out.splitlines()) == 1, out


def test_py2_era_cifar_batch_loads(tmp_path: Path) -> None:
    """The real CIFAR-10 batches come from Python 2 numpy: typestr and data as py2 str
    (bytes under encoding="bytes"), dtype args 0/1 rather than False/True."""
    def s(b: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING: a py2 str
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b

    x = np.random.RandomState(1).randint(0, 256, (2, 3072)).astype(np.uint8)
    dt = b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R(K\x03" + s(b"|") + b"NNN" \
        + _op_int(-1) + _op_int(-1) + b"K\x00tb"
    arr = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b")
           + b"\x87R(K\x01K\x02M\x00\x0c\x86" + dt + b"\x89" + s(x.tobytes()) + b"tb")
    p = tmp_path / "data_batch_1"
    p.write_bytes(b"\x80\x02}" + s(b"data") + arr + b"s" + s(b"labels") + b"](K\x03K\x07es.")
    xr, yr = read_cifar_batch(p)
    assert np.array_equal(xr.reshape(2, -1), x) and yr.tolist() == [3, 7]


def test_disk_full_on_results_is_one_line_error(tmp_path: Path, capsys,  # noqa: ANN001
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real = ckpt._write_bytes

    def full_on_text(f, data: bytes) -> None:  # noqa: ANN001
        if ".results.json." in _temp_name(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(ckpt, "_write_bytes", full_on_text)
    out = tmp_path / "run"
    rc = cli.main(["train", "--benchmark", "pdigits", "--n-tasks", "2", "--epochs", "1",
                   "--quiet", "--no-plots", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "No space left on device" in err and str(out / "results.json") in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (out / "results.json").exists() and not list(out.glob(".*.tmp"))


def test_bool_arrays_hold_only_true_and_false() -> None:
    # a bool array's bytes are the file's: 0x41 must read as True (1), never as 65
    b1 = _dtype_op("b1") + _dtype_state() + b"b"
    data = b"\x80\x02" + _array_op((3,), b1, b"\x00\x41\x01") + b"."
    a = RestrictedUnpickler(io.BytesIO(data)).load()
    assert a.dtype == np.bool_ and a.view(np.uint8).tolist() == [0, 1, 1]
