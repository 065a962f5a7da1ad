"""Ahead-of-time check: every launch the Triton launchers make, compiled for real GPUs.

    python3 -m blip_kernels.triton.aot_check --arch 80,90 [--json PATH]

No GPU is needed. The real launchers (quant, step, bits, fisher) run on small CPU
tensors with every kernel object swapped for a recorder, over workloads that reach
every branch they have: each parameter dtype (fp32/bf16/fp16, and the mixed x/grad_out
pairs of the Fisher ops), bias or not, momentum/Nesterov/weight decay, the
split-over-samples (atomic) Fisher path, sizes that are and are not multiples of 16,
a misaligned view, ints equal to 1; then the layers the models and the GPU benchmark
really have (MLP, ResNet-18, AlexNet, the benchmark's Linear/Conv2d; batches of 64, each
dtype, the split over samples an H100 would choose). Each recorded launch is bound exactly as Triton
binds it at run time, duplicates are dropped, every autotune config is expanded,
and each distinct specialisation is compiled for ``sm_<arch>`` in a child process
(a compiler assertion aborts its process, so it must not be ours). The table gives,
per kernel x config x arch: specialisations, failures, registers, spill bytes and
shared memory. Exit status 1 on any compile failure, on spills above ``--max-spill``
(default 0: every kernel here has a config space small enough to keep all values in
registers, and a spill inside the Fisher loops costs local-memory traffic per FMA),
or on a kernel that no workload launches.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import pkgutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_SKIP_MODULES = {"_aot", "_common", "aot_check"}


@dataclass
class Launch:
    kernel: str
    case: str
    fn: Any
    configs: list[dict[str, Any]] | None
    args: tuple
    kwargs: dict[str, Any]


@dataclass
class Row:
    kernel: str
    config: str
    arch: int
    case: str
    launches: int
    ok: bool
    error: str | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    key: str = field(default="", repr=False)


# ---------------------------------------------------------------- recording
def kernel_modules() -> list[ModuleType]:
    import blip_kernels.triton as pkg

    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                   if m.name not in _SKIP_MODULES)
    return [importlib.import_module(f"{pkg.__name__}.{n}") for n in names]


def defined_kernels(modules: list[ModuleType]) -> set[str]:
    """Every ``*_kernel`` a kernel module defines (the project's naming convention)."""
    from triton.runtime.jit import JITFunction

    return {
        name for mod in modules for name, obj in vars(mod).items()
        if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__
        and name.endswith("_kernel")
    }


class _Recorder:
    """Stands in for a kernel object: ``kernel[grid](*args, **kw)`` records the launch."""

    def __init__(self, kernel: Any, sink: list[Launch], case: list[str]) -> None:
        from . import _aot

        self.fn, self.configs = _aot.unwrap(kernel)
        self.sink, self.case = sink, case

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.sink.append(Launch(self.fn.__name__, self.case[0], self.fn, self.configs,
                                    args, kwargs))

        return launch


@contextlib.contextmanager
def recording(modules: list[ModuleType], sink: list[Launch], case: list[str]) -> Iterator[None]:
    """Swap every kernel object the launchers call (module globals that are jitted or
    autotuned kernels defined in that module) for a recorder, and restore them."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    saved: list[tuple[ModuleType, str, Any]] = []
    for mod in modules:
        for name, obj in list(vars(mod).items()):
            fn = obj.fn if isinstance(obj, Autotuner) else obj
            if isinstance(fn, JITFunction) and fn.fn.__module__ == mod.__name__:
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, sink, case))
    try:
        yield
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def _elementwise_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    from . import bits, quant, step

    def tensors(dtype: torch.dtype, n: int, offset: int) -> tuple[torch.Tensor, ...]:
        # offset=1 makes views whose data pointers are not 16-byte aligned.
        def make(dt: torch.dtype, fill: float = 0.0) -> torch.Tensor:
            return torch.full((n + offset,), fill, dtype=dt)[offset:]

        return make(dtype), make(dtype), make(torch.float32), make(torch.uint8)

    # Every flag combination in fp32; in bf16/fp16 (which differ only in the load and
    # store conversions) the plain kernels and the SGD step with every option on; the
    # odd size and the misaligned view (which drop the divisibility hints) likewise.
    shapes = [(dt, 4096, 0) for dt in DTYPES] + [(torch.float32, 1000, 0), (torch.float32, 4096, 1)]
    for dt, n, off in shapes:
        full = (dt, n, off) == (torch.float32, 4096, 0)
        tag = f"{_SHORT[dt]} n={n}" + (" misaligned" if off else "")
        w, g, prev, b = tensors(dt, n, off)
        yield f"quantize {tag}", lambda w=w, b=b: quant.quantize(w, b, 0.5)
        yield f"project {tag}", lambda w=w, p=prev, b=b: step.project_(w, p, b, 0.5, 20)
        yield f"sync {tag}", lambda w=w, p=prev, b=b: step.sync_(w, p, b, 0.5)
        flags = [(wd, mom, nest) for wd in (0.0, 0.01)
                 for mom, nest in ((0.0, False), (0.9, False), (0.9, True))]
        for wd, mom, nest in flags if full else flags[-1:]:
            buf = torch.zeros(n) if mom else None
            yield (f"sgd {tag} wd={wd} momentum={mom} nesterov={nest}",
                   lambda w=w, g=g, p=prev, b=b, buf=buf, wd=wd, mom=mom, nest=nest:
                   step.sgd_step_(w, g, p, b, buf, 0.5, 20, 0.1, mom, 0.0, nest, wd))
        if dt == torch.float32:
            f, fo = tensors(torch.float32, n, off)[2], torch.ones(n + off)[off:]
            for max_bit in (20, 8) if full else (20,):
                yield (f"update_bits {tag} max_bit={max_bit}",
                       lambda b=b, f=f, fo=fo, mb=max_bit: bits.update_bits_(b, f, fo, 0, mb))


def _linear(n: int, out: int, inp: int, xd: torch.dtype, cd: torch.dtype, bias: bool,
            length: int | None = None) -> Callable[[], None]:
    from . import fisher

    lead = (n,) if length is None else (n, length)
    x, c = torch.zeros(*lead, inp, dtype=xd), torch.zeros(*lead, out, dtype=cd)
    fw, fb = torch.zeros(out, inp), torch.zeros(out) if bias else None
    return lambda: fisher.fisher_linear_(fw, fb, x, c, 1.0)


def _conv(n: int, cin: int, cout: int, hw: int, k: int, stride: int, pad: int, dil: int,
          groups: int, xd: torch.dtype, cd: torch.dtype, bias: bool) -> Callable[[], None]:
    from . import fisher

    ho = (hw + 2 * pad - dil * (k - 1) - 1) // stride + 1
    x, c = torch.zeros(n, cin, hw, hw, dtype=xd), torch.zeros(n, cout, ho, ho, dtype=cd)
    fw, fb = torch.zeros(cout, cin // groups, k, k), torch.zeros(cout) if bias else None
    return lambda: fisher.fisher_conv2d_(fw, fb, x, c, (stride,) * 2, (pad,) * 2, (dil,) * 2,
                                         groups, 1.0)


#: ``split`` of a case that takes the split over samples an H100 (132 SMs) would get.
ON_H100: int = 0
_H100_SMS = 132


def _fisher_cases() -> Iterator[tuple[str, Callable[[], None], int]]:
    """(label, call, split): split is what the split-over-samples heuristic returns."""
    linear, conv = _linear, _conv
    f32, bf16 = torch.float32, torch.bfloat16
    # Every x/grad_out dtype pair on the heaviest path of each kernel (bias, and the
    # split over samples), first so that a --sample run covers them; then each other
    # branch (no bias, no split, shapes with ints == 1 or multiples of 16, in=0, groups,
    # dilation, kernel sizes 1..11) in fp32.
    for xd in DTYPES:
        for cd in DTYPES:
            tag = f"{_SHORT[xd]}/{_SHORT[cd]} bias"
            yield f"linear3d 4x10x24->20 {tag} split=3", linear(4, 20, 24, xd, cd, True, 10), 3
            yield f"linear2d 8x30->20 {tag}", linear(8, 20, 30, xd, cd, True), 1
    for dt in DTYPES:
        yield (f"conv3x3 s1p1 3->8 {_SHORT[dt]}/{_SHORT[dt]} bias split=3",
               conv(2, 3, 8, 9, 3, 1, 1, 1, 1, dt, dt, True), 3)
    yield "conv3x3 s1p1 3->8 bf16/fp32 bias split=1", conv(2, 3, 8, 9, 3, 1, 1, 1, 1, bf16, f32,
                                                           True), 1
    yield "conv3x3 s1p1 3->8 fp32/fp32 split=1", conv(2, 3, 8, 9, 3, 1, 1, 1, 1, f32, f32,
                                                      False), 1
    yield "linear2d 8x30->20 fp32/fp32", linear(8, 20, 30, f32, f32, False), 1
    yield "linear2d 64x48->32 (x16) bias", linear(64, 32, 48, f32, f32, True), 1
    yield "linear2d 1x30->1 bias", linear(1, 1, 30, f32, f32, True), 1
    yield "linear2d in=0 bias", linear(8, 20, 0, f32, f32, True), 1
    yield "linear3d 4x10x24->20 fp32/fp32 bias split=1", linear(4, 20, 24, f32, f32, True, 10), 1
    yield "linear3d 4x10x24->20 fp32/fp32 split=1", linear(4, 20, 24, f32, f32, False, 10), 1
    yield "linear3d 4x10x24->20 fp32/fp32 split=3", linear(4, 20, 24, f32, f32, False, 10), 3
    for bias, split in ((True, 3), (False, 1)):
        s = (" bias" if bias else "") + f" split={split}"
        yield f"conv3x3 s2p1 g2 4->6{s}", conv(2, 4, 6, 9, 3, 2, 1, 1, 2, f32, f32, bias), split
        yield f"conv1x1 16->32 (x16){s}", conv(2, 16, 32, 8, 1, 1, 0, 1, 1, f32, f32, bias), split
        yield f"conv5x5 p4 d2 3->5{s}", conv(2, 3, 5, 11, 5, 1, 4, 2, 1, f32, f32, bias), split
        yield f"conv11x11 s4p2 3->16{s}", conv(2, 3, 16, 35, 11, 4, 2, 1, 1, f32, f32, bias), split


def _layer_cases() -> Iterator[tuple[str, Callable[[], None], int]]:
    """The layers the models and benchmarks/gpu/bench.py really have: sizes that are
    multiples of 16 (so other divisibility specialisations than the odd shapes above),
    batches of 64, each dtype, with the split over samples an H100 would choose."""
    f32, bf16, f16 = DTYPES
    for xd, cd in ((f32, f32), (bf16, bf16), (f16, f16), (bf16, f32)):
        tag = f"{_SHORT[xd]}/{_SHORT[cd]}"
        for bias in (True, False):
            b = " bias" if bias else ""
            yield f"MLP linear2d 64x784->1200 {tag}{b}", _linear(64, 1200, 784, xd, cd, bias), 1
    yield "paper linear2d 100x784->1200 fp32/fp32 bias", _linear(100, 1200, 784, f32, f32,
                                                                 True), 1
    for dt in (f32, bf16, f16):
        tag = f"{_SHORT[dt]}/{_SHORT[dt]}"
        for bias in (True, False):
            b = " bias" if bias else ""
            yield (f"bench linear3d 8x128x1024->1024 {tag}{b}",
                   _linear(8, 1024, 1024, dt, dt, bias, 128), ON_H100)
            yield (f"bench conv3x3 s1p1 64->128 32x32 {tag}{b}",
                   _conv(64, 64, 128, 32, 3, 1, 1, 1, 1, dt, dt, bias), ON_H100)
            # ResNet-18 on 32x32 images: bias-free convs
            yield (f"ResNet conv3x3 s1p1 64->64 16x16 {tag}{b}",
                   _conv(64, 64, 64, 16, 3, 1, 1, 1, 1, dt, dt, bias), ON_H100)
        yield (f"ResNet stem conv3x3 s2p1 3->64 32x32 {tag}",
               _conv(64, 3, 64, 32, 3, 2, 1, 1, 1, dt, dt, False), ON_H100)
        yield (f"ResNet conv3x3 s2p1 64->128 16x16 {tag}",
               _conv(64, 64, 128, 16, 3, 2, 1, 1, 1, dt, dt, False), ON_H100)
        yield (f"ResNet shortcut conv1x1 s2 64->128 16x16 {tag}",
               _conv(64, 64, 128, 16, 1, 2, 0, 1, 1, dt, dt, False), ON_H100)
        yield (f"ResNet conv3x3 s1p1 512->512 2x2 {tag}",
               _conv(64, 512, 512, 2, 3, 1, 1, 1, 1, dt, dt, False), ON_H100)
        # AlexNet on 32x32 images (kernels size // 8, size // 10, 2), with bias
        yield (f"AlexNet conv4x4 3->64 32x32 {tag} bias",
               _conv(64, 3, 64, 32, 4, 1, 0, 1, 1, dt, dt, True), ON_H100)
        yield (f"AlexNet conv3x3 64->128 14x14 {tag} bias",
               _conv(64, 64, 128, 14, 3, 1, 0, 1, 1, dt, dt, True), ON_H100)
        yield (f"AlexNet conv2x2 128->256 6x6 {tag} bias",
               _conv(64, 128, 256, 6, 2, 1, 0, 1, 1, dt, dt, True), ON_H100)
    yield ("ResNet stem conv3x3 s2p1 3->64 84x84 fp32/fp32",
           _conv(16, 3, 64, 84, 3, 2, 1, 1, 1, f32, f32, False), ON_H100)
    for dt in (f32, bf16):
        yield (f"ImageNet ResNet stem conv7x7 s2p3 3->64 224x224 {_SHORT[dt]}/{_SHORT[dt]}",
               _conv(16, 3, 64, 224, 7, 2, 3, 1, 1, dt, dt, False), ON_H100)


def _split_as(split: int) -> Callable[[int, int, Any], int]:
    """A stand-in for fisher._split_n: ``split`` programs per tile (at most n), or with
    ON_H100 what the heuristic returns on a GPU of 132 SMs."""
    if split == ON_H100:
        from . import fisher

        return lambda n, tiles, device: fisher.split_for(n, tiles, _H100_SMS)
    return lambda n, tiles, device: min(n, split)


def record_launches() -> tuple[list[Launch], set[str]]:
    """Run the real launchers over every workload; return the launches and the kernels
    the kernel modules define."""
    from . import fisher

    modules = kernel_modules()
    sink: list[Launch] = []
    case = [""]
    real_split = fisher._split_n
    with recording(modules, sink, case):
        try:
            for label, call in _elementwise_cases():
                case[0] = label
                call()
            for label, call, split in (*_fisher_cases(), *_layer_cases()):
                case[0] = label
                fisher._split_n = _split_as(split)
                call()
        finally:
            fisher._split_n = real_split
    return sink, defined_kernels(modules)


# ---------------------------------------------------------------- compiling
def _config_label(options: dict[str, Any], constexprs: dict[Any, Any], fn: Any) -> str:
    names = [p.name for p in fn.params]
    blocks = " ".join(f"{names[k[0]]}={v}" for k, v in constexprs.items()
                      if names[k[0]].startswith("BLOCK"))
    regs = f" maxnreg={options['maxnreg']}" if options.get("maxnreg") else ""
    return f"{blocks} w{options.get('num_warps')} s{options.get('num_stages')}{regs}".strip()


def specialisations(launches: list[Launch], arch: int, kernels: set[str] | None,
                    sample: int | None) -> list[tuple[Row, Any]]:
    """Distinct (row, specialisation) pairs for one arch, autotune configs expanded."""
    from . import _aot

    seen: dict[str, Row] = {}
    out: list[tuple[Row, Any]] = []
    per_config: dict[tuple[str, str], int] = {}
    for ln in launches:
        if kernels is not None and ln.kernel not in kernels:
            continue
        for cfg in ln.configs or [{}]:
            spec = _aot.specialise(ln.fn, ln.args, {**ln.kwargs, **cfg}, arch)
            if spec.key in seen:
                seen[spec.key].launches += 1
                continue
            label = _config_label(spec.options, spec.constexprs, ln.fn)
            n = per_config.get((ln.kernel, label), 0)
            if sample is not None and n >= sample:
                continue
            per_config[(ln.kernel, label)] = n + 1
            row = Row(ln.kernel, label, arch, ln.case, 1, ok=False, key=spec.key)
            seen[spec.key] = row
            out.append((row, spec))
    return out


def _child(spec: Any, arch: int, conn: Any, log_path: str) -> None:
    # C++ assertions write to fd 2 and abort: keep that text for the parent.
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    from . import _aot

    try:
        conn.send(asdict(_aot.compile_for(spec, arch)))
    except _aot.TritonInternalsChanged as exc:
        conn.send({"internals": str(exc)})
    conn.close()


def compile_all(todo: list[tuple[Row, Any]], jobs: int) -> None:
    """Compile each specialisation in its own forked child, ``jobs`` at a time."""
    ctx = multiprocessing.get_context("fork")
    pending = list(todo)
    running: list[tuple[Row, Any, Any, str]] = []
    with tempfile.TemporaryDirectory(prefix="blip-aot-logs-") as logs:
        while pending or running:
            while pending and len(running) < jobs:
                row, spec = pending.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                log = os.path.join(logs, f"{len(pending)}-{row.arch}.log")
                proc = ctx.Process(target=_child, args=(spec, row.arch, send, log))
                proc.start()
                send.close()
                running.append((row, proc, recv, log))
            row, proc, recv, log = running.pop(0)
            try:
                result = recv.recv()
            except EOFError:  # the child died before sending (an abort in the compiler)
                result = None
            proc.join()
            if result is None:
                why = _diagnostic(log) or "no output"
                row.ok, row.error = False, f"compiler crashed (exit {proc.exitcode}): {why}"
                continue
            if "internals" in result:
                raise SystemExit(f"aot_check: error: {result['internals']}")
            for k, v in result.items():
                setattr(row, k, v)
            if not row.ok and (why := _diagnostic(log)):
                row.error = f"{row.error} | {why}"


def _diagnostic(log: str) -> str | None:
    """The compiler's own first complaint, which it writes to fd 2, not to Python."""
    with open(log, errors="replace") as fh:
        lines = [ln.strip() for ln in fh if ln.strip()]
    return next((ln for ln in lines if "Assertion" in ln or "error" in ln.lower()),
                lines[-1] if lines else None)


# ---------------------------------------------------------------- reporting
def _summary(rows: list[Row]) -> dict[tuple[str, str, int], dict[str, Any]]:
    out: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in rows:
        s = out.setdefault((r.kernel, r.config, r.arch), {
            "specialisations": 0, "failed": 0, "max_registers": 0, "max_spill_bytes": 0,
            "max_shared_bytes": 0, "spilling": 0})
        s["specialisations"] += 1
        if not r.ok:
            s["failed"] += 1
            continue
        spill = (r.spill_stores or 0) + (r.spill_loads or 0)
        s["spilling"] += spill > 0
        s["max_registers"] = max(s["max_registers"], r.registers or 0)
        s["max_spill_bytes"] = max(s["max_spill_bytes"], spill)
        s["max_shared_bytes"] = max(s["max_shared_bytes"], r.shared_bytes or 0)
    return out


def print_tables(rows: list[Row]) -> None:
    summary = _summary(rows)
    for kernel in sorted({r.kernel for r in rows}):
        print(f"\n{kernel}")
        print(f"  {'config':<40} {'arch':>5} {'specs':>5} {'failed':>6} {'regs':>5} "
              f"{'spilling':>8} {'spill B':>8} {'smem B':>7}")
        for (k, cfg, arch), s in sorted(summary.items()):
            if k != kernel:
                continue
            print(f"  {cfg:<40} {'sm_' + str(arch):>5} {s['specialisations']:>5} {s['failed']:>6} "
                  f"{s['max_registers']:>5} {s['spilling']:>8} {s['max_spill_bytes']:>8} "
                  f"{s['max_shared_bytes']:>7}")
        for r in rows:
            if r.kernel == kernel and not r.ok:
                print(f"    FAILED sm_{r.arch} [{r.config}] {r.case}: {r.error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m blip_kernels.triton.aot_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,90",
                        help="comma-separated compute capabilities, e.g. 80,90 (default)")
    parser.add_argument("--json", metavar="PATH", help="also write every row as JSON here")
    parser.add_argument("--max-spill", type=int, default=0, metavar="BYTES",
                        help="fail on a specialisation spilling more (stores+loads); default 0")
    parser.add_argument("--kernel", action="append", metavar="NAME",
                        help="only this kernel (repeatable)")
    parser.add_argument("--sample", type=int, metavar="N",
                        help="at most N specialisations per kernel x config x arch (quick runs)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiles in parallel (default: CPU count)")
    parser.add_argument("--list", action="store_true",
                        help="only print the recorded launches (kernel, workload), no compiling")
    args = parser.parse_args(argv)
    # Kernels (triton's own library functions included) must be decorated for compilation,
    # not for the interpreter; triton reads the variable as it decorates them, on import.
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "0"
    try:
        archs = [int(a) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        parser.error(f"--arch must be comma-separated integers like 80,90; got {args.arch!r}")
    if not archs or any(a < 70 or a >= 100 for a in archs):
        parser.error(f"--arch takes compute capabilities 70..99 (e.g. 80,90); got {args.arch!r}")
    if args.jobs < 1 or (args.sample is not None and args.sample < 1) or args.max_spill < 0:
        parser.error("--jobs and --sample must be >= 1, --max-spill >= 0")
    if args.json:  # fail now, not after minutes of compiling
        try:
            with open(args.json, "a"):
                pass
        except OSError as exc:
            parser.error(f"--json: cannot write {args.json}: {exc.strerror}")
    try:
        import triton  # noqa: F401 - probing
    except ImportError as exc:
        print(f"aot_check: error: triton is not importable: {exc}", file=sys.stderr)
        return 2
    from . import _aot
    from ._common import INTERPRET

    if INTERPRET:
        print("aot_check: error: triton or the kernels were imported under TRITON_INTERPRET=1; "
              "run this check in a fresh process (python3 -m blip_kernels.triton.aot_check)",
              file=sys.stderr)
        return 2
    if (note := _aot.version_note()) is not None:
        print(note, file=sys.stderr)

    start = time.perf_counter()
    launches, defined = record_launches()
    if args.list:
        for ln in launches:
            print(f"{ln.kernel}\t{ln.case}")
        return 0
    wanted = set(args.kernel) if args.kernel else None
    if wanted is not None and (unknown := wanted - defined):
        parser.error(f"--kernel: unknown kernel(s) {sorted(unknown)}; known: {sorted(defined)}")
    never = (wanted or defined) - {ln.kernel for ln in launches}
    todo = [item for arch in archs for item in specialisations(launches, arch, wanted, args.sample)]
    for arch in archs:
        _aot.warm_up(arch)
    compile_all(todo, args.jobs)
    rows = [row for row, _ in todo]
    elapsed = time.perf_counter() - start
    print_tables(rows)

    failed = [r for r in rows if not r.ok]
    spilling = [r for r in rows if r.ok and (r.spill_stores or 0) + (r.spill_loads or 0)
                > args.max_spill]
    print(f"\n{len(launches)} launches recorded, {len(rows)} specialisations compiled for "
          f"{', '.join(f'sm_{a}' for a in archs)} in {elapsed:.1f} s: {len(failed)} failed, "
          f"{len(spilling)} spill more than {args.max_spill} B")
    for k in sorted(never):
        print(f"kernel {k} is defined but no workload launches it: add one to aot_check",
              file=sys.stderr)
    if args.json:
        payload = {"triton": __import__("triton").__version__, "archs": archs,
                   "seconds": round(elapsed, 1), "launches": len(launches),
                   "rows": [asdict(r) for r in rows]}
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1)
    return 1 if failed or spilling or never else 0


if __name__ == "__main__":
    sys.exit(main())
