"""The classification trainer: learn a task stream with a method, write a run directory.

Schedule (the authors' default): plain SGD; after `lr_patience` epochs without a
new best validation loss the lr is divided by `lr_factor`; training of a task stops
when the lr falls below `lr_min` or the epoch budget ends; the best-validation model
is restored at the end of each task.

Determinism: the model is initialised under `torch.manual_seed(seed)`; each task
re-seeds the global RNGs from (seed, task) and each epoch's shuffling uses its own
generator seeded from (seed, task, epoch). Nothing therefore depends on what the
process did before, so a run resumed from a checkpoint ends with the same accuracy
matrix as an uninterrupted one.

The trainer knows no method by name and nothing of any method's internals: it calls the
hooks of :mod:`blip.methods.base` (method-specific settings such as BLIP's ``F_prior`` are
method hyper-parameters in ``method_kwargs``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import validate
from ..distributed import all_reduce_sum_, rows
from ..methods import Method, make_method, method_class, method_names
from ..modes import batchnorm_eval
from ..nn import load_state_dict_atomic
from ..runs import checkpoint as ckpt
from ..runs import metrics
from ..runs.backend_info import kernel_backend
from ..runs.rundir import RUNS_ROOT, Progress, Runner, matrix_csv, run_name
from ..runs.seeds import derive_seed, seed_everything
from . import ddp
from .data import TaskData, TaskStream, load_benchmark
from .presets import Preset, get_preset
from .step import COMPILE_MODES, batches, check_capturable, make_step, warm_up

RESULTS = "results.json"
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_KEYS = ("task", "config", "model", "method", "rng", "acc", "records", "bits_hist")
# What every method's after_task gets: the task's training set, subsampled (seeded) to
# this many samples before it becomes float inputs, to bound memory (the Fisher methods
# use at most 80 x 100 of them).
END_OF_TASK_MAX_SAMPLES = 20_000


@dataclass
class TrainConfig:
    benchmark: str = "pdigits"
    method: str = "blip"
    model: str = "mlp"
    epochs: int = 30
    lr: float = 0.1
    batch_size: int = 64
    hidden: int = 100
    n_hidden_layers: int = 1
    width: float = 1.0
    # architecture options (blip.models; None: the model's default) and BatchNorm in eval
    # mode from task 1 on: see blip.classification.presets.Preset
    fc1_width: int | None = None
    fc2_width: int | None = None
    fc_dropout: float | None = None
    pool_window: int | None = None
    batchnorm_eval_from_task1: bool = False
    lr_patience: int = 5
    lr_factor: float = 3.0
    lr_min: float = 1e-4
    momentum: float = 0.0
    seed: int = 0
    n_tasks: int | None = None
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads on CPU (None: torch's default)
    data_dir: str | None = None
    download: bool = False
    method_kwargs: dict = field(default_factory=dict)  # the method's hyper-parameters
    # unpickle data-set files and old checkpoints without restriction (blip.runs.safeload)
    trust_pickles: bool = False
    # the authors' NaN stop: a non-finite epoch ends the task, its best state is restored
    stop_on_nonfinite: bool = False
    # the training step: fused where it applies, else eager ("off"), autograd ("eager"),
    # torch.compile'd or CUDA-graph captured (step.py)
    compile: str = "off"

    # Keys that change the numbers a run produces: a resume must match them.
    RESULT_KEYS = ("benchmark", "method", "model", "epochs", "lr", "batch_size", "hidden",
                   "n_hidden_layers", "width", "lr_patience", "lr_factor", "lr_min",
                   "momentum", "seed", "n_tasks", "method_kwargs", "stop_on_nonfinite",
                   "fc1_width", "fc2_width", "fc_dropout", "pool_window",
                   "batchnorm_eval_from_task1")
    # what a config written before these settings existed ran with
    ARCH_DEFAULTS = {"fc1_width": None, "fc2_width": None, "fc_dropout": None,
                     "pool_window": None, "batchnorm_eval_from_task1": False}

    @classmethod
    def from_preset(cls, benchmark: str, model: str | None = None, **overrides: Any) -> TrainConfig:
        """The benchmark's published preset, with every non-None override applied."""
        p = get_preset(benchmark, model)
        names = {f.name for f in fields(cls)}
        base = {k: v for k, v in p.to_dict().items() if k in names}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown TrainConfig fields: {sorted(unknown)}")
        base.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(benchmark=benchmark, **base)
        # the preset's method hyper-parameters (e.g. F_prior) for a method that takes them
        # (not those a named variant sets: they are what the variant is)
        mcls = method_class(cfg.method)
        preset_hp = {k: v for k, v in p.method_hparams(mcls.HPARAMS, cfg.method).items()
                     if k not in mcls.VARIANT_SETTINGS}
        cfg.method_kwargs = {**preset_hp, **cfg.method_kwargs}
        return cfg

    @classmethod
    def upgrade(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """A saved config (checkpoint, results.json) in today's layout: configs written
        before F_prior/max_bit became method hyper-parameters held them at the top level;
        those written before the architecture options get the models' defaults."""
        saved = {**cls.ARCH_DEFAULTS, **saved}
        if not any(k in saved for k in Preset.METHOD_HPARAMS + ("max_bit",)):
            return saved
        saved = dict(saved)
        kwargs = dict(saved.get("method_kwargs") or {})
        accepted = method_class(saved["method"]).HPARAMS \
            if saved.get("method") in method_names() else {}
        for k in Preset.METHOD_HPARAMS + ("max_bit",):
            if k not in saved:
                continue
            v = saved.pop(k)
            # the old trainer passed F_prior (always) and max_bit to methods accepting them;
            # today a default max_bit is not written out
            if k in accepted and not (k == "max_bit" and v == accepted[k]):
                kwargs.setdefault(k, v)
        saved["method_kwargs"] = kwargs
        return saved

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Every setting's type and range (numbers finite in float32, no bools for
        numbers), named, before anything is loaded or trained. The method's own
        hyper-parameters (``method_kwargs``: F_prior, max_bit, ...) are the method's to
        check (:func:`preflight`)."""
        V = validate
        for k in ("epochs", "batch_size", "lr_patience"):
            V.number(k, getattr(self, k), lo=1, integer=True)
        V.number("hidden", self.hidden, lo=1, hi=V.MAX_HIDDEN, integer=True)
        V.number("n_hidden_layers", self.n_hidden_layers, lo=0, hi=V.MAX_LAYERS, integer=True)
        V.number("seed", self.seed, lo=0, hi=V.MAX_SEED, integer=True)
        V.optional_int("threads", self.threads, 1, hi=V.MAX_THREADS)
        V.optional_int("n_tasks", self.n_tasks, 1)
        for k in ("lr", "lr_min"):
            V.number(k, getattr(self, k), lo=0.0, lo_open=True)
        V.number("width", self.width, lo=0.0, lo_open=True, hi=V.MAX_WIDTH)
        V.number("lr_factor", self.lr_factor, lo=1.0, lo_open=True)
        V.number("momentum", self.momentum, lo=0.0, hi=1.0, hi_open=True)
        for k in ("benchmark", "method", "model", "device"):
            if not isinstance(getattr(self, k), str):
                raise ValueError(f"{k} must be a string; got {getattr(self, k)!r}")
        self._validate_arch()
        if not isinstance(self.stop_on_nonfinite, bool):
            raise ValueError(f"stop_on_nonfinite must be True or False; got "
                             f"{self.stop_on_nonfinite!r}")
        if not isinstance(self.method_kwargs, dict):
            raise ValueError(f"method_kwargs must be a dict; got {self.method_kwargs!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}; "
                             f"got {self.compile!r}")
        if re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is None:
            raise ValueError(f"device must be cpu, cuda or cuda:N; got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but CUDA is not available here")

    def _validate_arch(self) -> None:
        """The architecture options: their types and ranges, and only the model's own."""
        V = validate
        for k in ("fc1_width", "fc2_width", "pool_window"):
            V.optional_int(k, getattr(self, k), 1)
        if self.fc_dropout is not None:
            V.number("fc_dropout", self.fc_dropout, lo=0.0, hi=1.0, hi_open=True)
        if not isinstance(self.batchnorm_eval_from_task1, bool):
            raise ValueError(f"batchnorm_eval_from_task1 must be True or False; got "
                             f"{self.batchnorm_eval_from_task1!r}")
        for k, model in Preset.ARCH_OPTIONS.items():  # refused rather than silently ignored
            if getattr(self, k) is not None and self.model != model:
                raise ValueError(f"{k}={getattr(self, k)!r} applies to model {model!r} only, "
                                 f"not {self.model!r} (leave {k} None)")


def build_model(cfg: TrainConfig, stream: TaskStream) -> nn.Module:
    """The run's network; an allocation failure is a ValueError naming the size settings."""
    try:
        return _build_model(cfg, stream)
    except (MemoryError, RuntimeError) as e:  # within the bounds, still too big for here
        if not isinstance(e, MemoryError) and "alloc" not in str(e) and "memory" not in str(e):
            raise
        size = (f"hidden={cfg.hidden}, n_hidden_layers={cfg.n_hidden_layers}"
                if cfg.model == "mlp" else f"width={cfg.width}")
        raise ValueError(f"model {cfg.model!r} with {size} does not fit in memory here "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _build_model(cfg: TrainConfig, stream: TaskStream) -> nn.Module:
    from .. import models

    cpt = stream.classes_per_task
    if cfg.model == "mlp":
        return models.MLP(stream.in_features, hidden=cfg.hidden, classes_per_task=cpt,
                          n_hidden_layers=cfg.n_hidden_layers)
    if len(stream.input_shape) != 3:
        raise ValueError(f"model {cfg.model!r} needs image inputs (C, H, W); benchmark "
                         f"{cfg.benchmark!r} gives {stream.input_shape}")
    if cfg.model == "alexnet":
        return models.AlexNet(stream.input_shape, cpt, width=cfg.width, fc1_width=cfg.fc1_width,
                              fc2_width=cfg.fc2_width, fc_dropout=cfg.fc_dropout)
    if cfg.model == "resnet18":
        return models.ResNet18(stream.input_shape, cpt, width=cfg.width,
                               pool_window=cfg.pool_window)
    raise ValueError(f"unknown model {cfg.model!r}; choose mlp, alexnet or resnet18")


def method_hparams(cfg: TrainConfig) -> dict:
    """The method's hyper-parameters: ``method_kwargs``, the preset's momentum, and the run's
    seed for a method whose ``seed`` defaults to it."""
    hp = dict(cfg.method_kwargs)
    hp.setdefault("momentum", cfg.momentum)
    if method_class(cfg.method).SEED_FROM_RUN:
        hp.setdefault("seed", cfg.seed)
    return hp


def resolved_hparams(cfg: TrainConfig) -> dict[str, Any]:
    """Every hyper-parameter the method runs with, defaults included, as JSON types, and its
    class's ``DEFAULTS_REVISION``: recorded in the checkpoint and results.json so that a
    resume or a reuse by ``blip compare`` never carries a run on under other defaults."""
    cls = method_class(cfg.method)
    return {"revision": cls.DEFAULTS_REVISION,
            "values": ckpt.jsonable({**cls.HPARAMS, **method_hparams(cfg)})}


def check_same_hparams(saved: dict[str, Any] | None, cfg: TrainConfig, path: Path) -> None:
    """Refuse a run directory whose method ran with other hyper-parameters than ``cfg``'s
    (``saved``: its recorded :func:`resolved_hparams`; None for a run written before they
    were recorded, which is accepted only while the method's defaults are unchanged)."""
    now = resolved_hparams(cfg)
    if saved is None:
        if now["revision"] == 1:
            return
        raise ValueError(f"cannot resume {path}: it was written before method {cfg.method!r} "
                         f"recorded its hyper-parameters, and the method's defaults have "
                         f"changed since (docs/baselines.md); start the run again")
    # A hyper-parameter the record lacks was added to the method later, at the default
    # that reproduces what ran before it existed (a default that changes meaning bumps
    # DEFAULTS_REVISION instead): the record is read with that default.
    defaults = ckpt.jsonable(method_class(cfg.method).HPARAMS)
    saved = {**saved, "values": {**{k: v for k, v in defaults.items()
                                    if k not in saved.get("values", {})},
                                 **saved.get("values", {})}}
    if saved != now:
        old, new = saved.get("values", {}), now["values"]
        diff = sorted(k for k in {*old, *new} if old.get(k) != new.get(k)) or ["revision"]
        detail = ", ".join(f"{k}: {old.get(k)!r} vs now {new.get(k)!r}" for k in diff)
        raise ValueError(f"cannot resume {path}: method {cfg.method!r} ran with other "
                         f"hyper-parameters ({detail}); pass the same --hp values or start "
                         f"the run again")


def _check_method(cfg: TrainConfig) -> None:
    # the method's __init__ checks its hyper-parameters; built on a tiny bundled model,
    # trunk and heads, so a method that looks at the model's shape finds the usual one
    from ..models import MLP

    make_method(cfg.method, MLP(1, 2, [2]), **method_hparams(cfg))
    if cfg.compile == "cudagraph":
        check_capturable(method_class(cfg.method))


def preflight(cfg: TrainConfig) -> None:
    """Every check that needs no data: the config, then the method's hyper-parameters."""
    cfg.validate()
    _check_method(cfg)


class Trainer(Runner):
    cfg: TrainConfig

    def __init__(self, cfg: TrainConfig, out: str | Path, quiet: bool = False,
                 plots: bool = True, stream: TaskStream | None = None,
                 hooks: Sequence[Any] = ()) -> None:
        super().__init__(cfg, out, quiet, plots)  # validates cfg
        _check_method(cfg)  # with the config: preflight(cfg), before any data is loaded
        # torchrun's process group, if any (ddp.py): rank 0 alone logs and writes
        self.group = ddp.join(cfg.device)
        if self.group.world > 1:
            ddp.check_supported(self.group, method_class(cfg.method), cfg.compile)
            self.device = self.group.device
            self.quiet = quiet or self.group.rank != 0
            self.progress = self.progress and self.group.rank == 0
            if self.device.type == "cpu":
                torch.set_num_threads(ddp.cpu_threads(cfg.threads, self.group.world))
        self._stream = stream
        # observers (TensorBoard, compare's progress): optional on_epoch / on_task / close
        self.hooks = list(hooks)

    def _emit(self, event: str, *args: Any) -> None:
        for h in self.hooks:
            if hasattr(h, event):
                getattr(h, event)(*args)

    # -- setup --------------------------------------------------------------------------

    def _load_stream(self) -> TaskStream:
        s = self._stream or load_benchmark(self.cfg.benchmark, self.cfg.data_dir,
                                           self.cfg.download, self.cfg.seed,
                                           trust_pickles=self.cfg.trust_pickles)
        if self.cfg.n_tasks is not None and self.cfg.n_tasks < len(s):
            s = s.truncated(self.cfg.n_tasks)
        return s

    def _setup(self, stream: TaskStream) -> tuple[nn.Module, Method]:
        seed_everything(self.cfg.seed)
        model = build_model(self.cfg, stream)
        method = make_method(self.cfg.method, model, **method_hparams(self.cfg))
        net = method.prepare().to(self.device)
        ddp.check_model(self.group, net)
        return net, method

    # -- one task -----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, net: nn.Module, task: TaskData, t: int, split: str = "test",
                 batch: int = 1024, method: Method | None = None) -> tuple[float, float]:
        x_all, y_all = getattr(task, f"x_{split}"), getattr(task, f"y_{split}")
        n = max(len(y_all), 1)
        share = rows(len(y_all))  # this rank's rows; the sums are all-reduced below
        x_all, y_all = x_all[share], y_all[share]
        net.eval()
        # summed on the device (float64, as Python's float): one sync per call, not per batch
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for i in range(0, len(y_all), batch):
            x = task.inputs(x_all[i:i + batch].to(self.device, non_blocking=True))
            y = y_all[i:i + batch].to(self.device, non_blocking=True)
            # the method may evaluate task t differently (e.g. with task t's mask)
            with method.eval_context(t) if method is not None else contextlib.nullcontext():
                out = net(x, t)
            loss_sum += F.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
        all_reduce_sum_([loss_sum, correct])  # every rank takes the same lr / best decisions
        return float(loss_sum) / n, int(correct) / n

    def _train_epoch(self, net: nn.Module, method: Method, step: Any,
                     task: TaskData, t: int, epoch: int, x_train: torch.Tensor,
                     y_train: torch.Tensor) -> int:
        """One pass over the task's training set in a seeded order; returns the steps.
        ``step(x, y)`` is the method's training step (classification/step.py)."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, t, epoch))
        perm = torch.randperm(len(y_train), generator=g).to(self.device)
        method.before_epoch(t, epoch)
        net.train()
        if cfg.batchnorm_eval_from_task1 and t > 0:
            batchnorm_eval(net)  # the statistics of task 0 normalise and stay
        steps = 0
        # gathered a chunk at a time on the device, each batch a view (step.batches)
        for x, y in batches(task, x_train, y_train, perm, cfg.batch_size):
            step(x, y)
            steps += 1
        if hasattr(step, "flush"):  # a captured step's skipped-element counts, per epoch
            step.flush()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return steps

    def train_task(self, net: nn.Module, method: Method, task: TaskData, t: int) -> dict:
        """The authors' schedule on one task (see the module doc); restores the best epoch."""
        cfg = self.cfg
        method.before_task(t)
        opt = method.make_optimizer(t, cfg.lr)
        step = make_step(cfg.compile, method, net, opt, t, self.device)
        x_train = task.x_train.to(self.device)
        y_train = task.y_train.to(self.device)
        lr, patience = cfg.lr, cfg.lr_patience
        best_loss, best_state, best_epoch = math.inf, copy.deepcopy(net.state_dict()), -1
        steps, step_time, epochs_run = 0, 0.0, 0
        stopped_nonfinite: int | None = None  # the epoch the NaN stop ended the task at
        bar = Progress(cfg.epochs, f"task {t}", self.progress)
        for epoch in range(cfg.epochs):
            t0 = time.perf_counter()
            steps += self._train_epoch(net, method, step, task, t, epoch, x_train, y_train)
            step_time += time.perf_counter() - t0
            epochs_run += 1
            val_loss, val_acc = self.evaluate(net, task, t, "valid", method=method)
            self._emit("on_epoch", t, val_loss, val_acc, lr)
            if cfg.stop_on_nonfinite and nonfinite_epoch(net, opt, val_loss):
                stopped_nonfinite = epoch
                self.log(f"task {t}: non-finite loss at epoch {epoch}: stopping the task and "
                         f"restoring its best epoch ({best_epoch})")
                break
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                best_state = copy.deepcopy(net.state_dict())
                patience = cfg.lr_patience
            else:
                patience -= 1
                if patience <= 0:
                    lr /= cfg.lr_factor
                    if lr < cfg.lr_min:
                        bar.update(loss=f"{val_loss:.3f}", acc=f"{100 * val_acc:.1f}", lr=lr)
                        break
                    patience = cfg.lr_patience
                    for group in opt.param_groups:
                        group["lr"] = lr
            bar.update(loss=f"{val_loss:.3f}", acc=f"{100 * val_acc:.1f}", lr=f"{lr:.2g}")
        bar.close()
        if hasattr(step, "finish"):  # a captured step hands back its skipped-element counts
            step.finish()
        net.load_state_dict(best_state)
        # Gradient elements the fused step skipped for being NaN/Inf: never silent.
        skipped = opt.skipped_nonfinite() if hasattr(opt, "skipped_nonfinite") else 0
        if skipped:
            warnings.warn(f"task {t}: the fused step skipped {skipped} NaN/Inf gradient "
                          "elements (their weights kept their values)", stacklevel=2)
        return {"epochs_run": epochs_run, "best_epoch": best_epoch, "best_valid_loss": best_loss,
                "final_lr": lr, "steps": steps, "train_step_seconds": step_time,
                "seconds_per_step": step_time / max(steps, 1),
                "skipped_nonfinite_grads": skipped, "stopped_nonfinite": stopped_nonfinite}

    def _end_of_task_sample(self, task: TaskData, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``Method.after_task`` gets: the training set, at most
        END_OF_TASK_MAX_SAMPLES of it (seeded), as model inputs on the run's device."""
        x, y = task.x_train, task.y_train
        if len(y) > END_OF_TASK_MAX_SAMPLES:
            g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, t, 1 << 20))
            idx = torch.randperm(len(y), generator=g)[:END_OF_TASK_MAX_SAMPLES]
            x, y = x[idx], y[idx]
        return task.inputs(x.to(self.device)), y.to(self.device)

    def learn_task(self, net: nn.Module, method: Method, stream: TaskStream, t: int,
                   acc: Any) -> tuple[dict, dict[str, list[int]]]:
        """Train task ``t``, end it, test every task so far into ``acc[t]``; returns the
        task's record and its bits histograms (empty for a method without bits)."""
        task = stream[t]
        seed_everything(derive_seed(self.cfg.seed, t))
        t0 = time.perf_counter()
        info = self.train_task(net, method, task, t)
        t1 = time.perf_counter()
        # the validation accuracy as training left it, before the method's end of task
        # (BLIP's sync rounds the weights onto their bits' grids): what that step costs
        valid_before_end = self.evaluate(net, task, t, "valid", method=method)[1]
        sample_x, sample_y = self._end_of_task_sample(task, t)
        # sync_rng_state, after_task, check_identical (a no-op check on one process)
        stats = ddp.end_task(net, method, t, sample_x, sample_y)
        del sample_x, sample_y
        t2 = time.perf_counter()
        for u in range(t + 1):
            acc[t, u] = self.evaluate(net, stream[u], u, method=method)[1]
        # the same row on the validation splits: what settings may be chosen on
        valid_row = [self.evaluate(net, stream[u], u, "valid", method=method)[1]
                     for u in range(t + 1)]
        t3 = time.perf_counter()
        n_params = sum(p.numel() for p in net.parameters())
        record = {
            "task": t, "name": task.name, **info,
            "train_seconds": t1 - t0, "end_task_seconds": t2 - t1,
            "eval_seconds": t3 - t2, "seconds": t3 - t0,
            "valid_acc_before_end_task": valid_before_end, "valid_acc_row": valid_row,
            "capacity": {k: float(v) for k, v in (method.layer_capacity() or {}).items()},
            "method_stats": ckpt.jsonable(stats),
            # memory the method keeps beyond the model's weights, per weight
            "extra_bytes_per_param": method.extra_state_bytes() / n_params,
        }
        return record, method.bits_histograms() or {}

    # -- bookkeeping --------------------------------------------------------------------

    def _write_outputs(self, state: dict, stream: TaskStream, done: bool) -> dict:
        matrix = state["acc"]
        T = len(stream)
        last = state["task"]
        summ = metrics.summary(matrix, last) if last >= 0 else {}
        records = state["records"]
        results = {
            "benchmark": self.cfg.benchmark,
            "method": self.cfg.method,
            "task_names": [t.name for t in stream],
            "n_tasks": T,
            "tasks_done": last + 1,
            "complete": done,
            "acc_matrix": metrics.matrix_to_list(matrix),
            "acc": summ.get("acc"),
            "bwt": summ.get("bwt"),
            "bwt_authors": summ.get("bwt_authors"),
            "bwt_note": "bwt divides by T-1 (usual); bwt_authors divides by T (authors' scripts)",
            "forgetting": summ.get("forgetting"),
            **valid_summary(records, T),
            "capacity": [r.get("capacity", {}) for r in records],
            "task_seconds": [r["seconds"] for r in records],
            "end_task_seconds": [r["end_task_seconds"] for r in records],
            "total_seconds": sum(r["seconds"] for r in records),
            "tasks": records,
            "bits_hist": state["bits_hist"],
            **fisher_summary(self.cfg, records),
            "config": self.cfg.to_dict(),
            "method_hparams": resolved_hparams(self.cfg),
            "torch": torch.__version__,
            "device": str(self.device),
            "kernel_backend": kernel_backend(self.device),
            # one-time costs (imports, first calls) paid before task 0's clock started
            "warmup_seconds": getattr(self, "warmup_seconds", 0.0),
            "world_size": self.group.world,
            "dist_backend": self.group.backend,
        }
        if self.group.rank != 0:
            return results
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt.write_text_atomic(self.out / RESULTS, json.dumps(results, indent=1))
        ckpt.write_text_atomic(self.out / "acc_matrix.json",
                               json.dumps(metrics.matrix_to_list(matrix)))
        ckpt.write_text_atomic(self.out / "acc_matrix.csv", matrix_csv(
            matrix, "after_task", [f"task{j}" for j in range(T)], range(T), ".6f"))
        return results

    def _make_plots(self, results: dict, matrix: Any) -> None:
        from . import plots

        title = f"{self.cfg.benchmark} / {self.cfg.method}: ACC {100 * results['acc']:.1f}, " \
                f"BWT {100 * results['bwt']:+.2f}"
        plots.acc_heatmap(matrix, self.out / "acc_matrix.png", title)
        if results["bits_hist"] and results["bits_hist"][0]:
            plots.bits_histograms(results["bits_hist"], self.out / "bits_hist.png")
            plots.capacity_curve(results["capacity"], self.out / "capacity.png")

    def _checkpoint(self, state: dict, net: nn.Module, method: Method) -> None:
        if self.group.rank != 0:
            return
        ckpt.save_atomic({
            "version": 1, "task": state["task"], "config": self.cfg.to_dict(),
            "method_hparams": resolved_hparams(self.cfg),
            "model": net.state_dict(), "method": method.state_dict(), "rng": ckpt.rng_state(),
            "acc": metrics.matrix_to_list(state["acc"]), "records": state["records"],
            "bits_hist": state["bits_hist"],
        }, self.out / CHECKPOINT)

    def _start(self, net: nn.Module, method: Method, T: int, resume: bool) -> dict[str, Any]:
        """A fresh run's state, or the checkpoint's when resuming one."""
        path = self.out / CHECKPOINT
        if resume and path.is_file():
            c = ckpt.load(path, map_location=self.device, required=CHECKPOINT_KEYS,
                          trust_pickles=self.cfg.trust_pickles)
            self._check_compatible(c["config"])
            check_same_hparams(c.get("method_hparams"), self.cfg, path)
            load_state_dict_atomic(net, c["model"])
            try:
                method.load_state_dict(c["method"])
            except KeyError as e:  # a checkpoint of an older layout of this method's state
                raise ValueError(f"cannot resume {path}: its {self.cfg.method!r} state lacks "
                                 f"{e.args[0]!r} (written by another version of the method?); "
                                 f"start the run again without --resume") from None
            ckpt.set_rng_state(c["rng"])
            self.log(f"resuming {self.out} after task {c['task']} of {T}")
            return {"task": c["task"], "acc": metrics.matrix_from_list(c["acc"]),
                    "records": c["records"], "bits_hist": c["bits_hist"]}
        if resume:
            self.log(f"no checkpoint in {self.out}; starting from scratch")
        elif path.is_file():
            self.log(f"overwriting the run in {self.out} (use --resume to continue it)")
        return {"task": -1, "acc": metrics.new_matrix(T), "records": [], "bits_hist": []}

    # -- the run ------------------------------------------------------------------------

    def run(self, resume: bool = False) -> dict:
        cfg = self.cfg
        if self.group.rank == 0:  # before hours of training, not after
            validate.writable_dir(self.out, "out directory")
        stream = self._load_stream()
        T = len(stream)
        t0 = time.perf_counter()
        warm_up(cfg.method, method_hparams(cfg), self.device)  # before _setup seeds the RNGs
        self.warmup_seconds = time.perf_counter() - t0
        net, method = self._setup(stream)
        state = self._start(net, method, T, resume)
        ddp.check_start(net, method, state["task"])  # every rank read the same checkpoint
        self._emit("on_start", T, state["task"] + 1)
        n_params = sum(p.numel() for p in net.parameters())
        self.log(f"{cfg.benchmark}: {T} tasks, input {stream.input_shape}; {cfg.method} on "
                 f"{cfg.model} ({n_params} parameters), device {self.device}, kernels "
                 f"{kernel_backend(self.device)}, seed {cfg.seed}")
        for t in range(state["task"] + 1, T):
            record, hist = self.learn_task(net, method, stream, t, state["acc"])
            state["records"].append(record)
            state["bits_hist"].append(hist)
            state["task"] = t
            self._log_task(record, state["acc"][t, : t + 1])
            self._emit("on_task", t, [float(v) for v in state["acc"][t, : t + 1]],
                       record["capacity"], hist)
            # the checkpoint first: results.json never describes a task the checkpoint
            # lacks (a failed write stops the run with both files at the previous task)
            self._checkpoint(state, net, method)
            self._write_outputs(state, stream, done=t == T - 1)
        results = self._write_outputs(state, stream, done=True)
        self._emit("close")
        if self.plots and self.group.rank == 0:
            try:
                self._make_plots(results, state["acc"])
            except ImportError as e:
                self.log(f"plots skipped: {e}")
        self.log(f"ACC {100 * results['acc']:.2f}  BWT {100 * results['bwt']:+.2f} "
                 f"(authors' /T: {100 * results['bwt_authors']:+.2f})  "
                 f"time {results['total_seconds']:.1f}s  -> {self.out}")
        return results

    def _log_task(self, record: dict, row: Any) -> None:
        accs = " ".join(f"{100 * v:5.1f}" for v in row)
        cap = record["capacity"]
        capmsg = f", capacity {100 * cap['overall']:.1f}%" if "overall" in cap else ""
        self.log(f"task {record['task']} ({record['name']}): {record['epochs_run']} epochs, "
                 f"{record['seconds']:.1f}s{capmsg} | acc {accs}")

    def _check_compatible(self, saved: dict[str, Any]) -> None:
        # a checkpoint written before the NaN-stop option ran without it
        saved = {"stop_on_nonfinite": False, **TrainConfig.upgrade(saved)}
        ckpt.check_resumable(saved, self.cfg.to_dict(),
                             TrainConfig.RESULT_KEYS, self.out / CHECKPOINT)


def nonfinite_epoch(net: nn.Module, opt: torch.optim.Optimizer, val_loss: float) -> bool:
    """Whether the epoch just run went non-finite: the authors stop when the train or valid
    loss is NaN (IC/approaches/blip.py:67-69). Without an extra pass over the training set:
    a NaN/Inf valid loss or weight, or NaN/Inf gradient elements that the fused step skipped
    (the training loss went non-finite, yet the skip kept the weights finite)."""
    if not math.isfinite(val_loss):
        return True
    if hasattr(opt, "skipped_nonfinite") and opt.skipped_nonfinite() > 0:
        return True
    return not all(bool(torch.isfinite(p).all()) for p in net.parameters())


def valid_summary(records: list[dict], T: int) -> dict[str, Any]:
    """The accuracy matrix, ACC and BWT on the validation splits (settings are chosen on
    these, never on the test splits); None where a record lacks its row (a run resumed
    from a checkpoint written before rows were recorded)."""
    rows = [r.get("valid_acc_row") for r in records]
    if not rows or any(row is None for row in rows):
        return {"valid_acc_matrix": None, "valid_acc": None, "valid_bwt": None}
    matrix = metrics.new_matrix(T)
    for t, row in enumerate(rows):
        matrix[t, : len(row)] = row
    summ = metrics.summary(matrix, len(rows) - 1)
    return {"valid_acc_matrix": metrics.matrix_to_list(matrix), "valid_acc": summ["acc"],
            "valid_bwt": summ["bwt"]}


def fisher_summary(cfg: TrainConfig, records: list[dict]) -> dict[str, Any]:
    """The end-of-task Fisher budget (batches x batch size, for a method that has one) and
    the samples each task's estimate used: fewer than the budget on a short task."""
    hp = {**method_class(cfg.method).HPARAMS, **method_hparams(cfg)}
    budget = (hp["fisher_batches"] * hp["fisher_batch_size"]
              if isinstance(hp.get("fisher_batches"), int)
              and isinstance(hp.get("fisher_batch_size"), int) else None)
    used = [r.get("method_stats", {}).get("fisher_samples") for r in records]
    return {"fisher_budget": budget, "fisher_samples": used}


def default_run_dir(cfg: TrainConfig) -> Path:
    return RUNS_ROOT / run_name(cfg.benchmark, cfg.method, seed=cfg.seed)


def train(cfg: TrainConfig, out: str | Path | None = None, resume: bool = False,
          quiet: bool = False, plots: bool = True, hooks: Sequence[Any] = ()) -> dict:
    """Run (or resume) a whole task stream; returns the results dict. ``hooks``: observers
    of epochs and tasks (:class:`Trainer`), e.g. :class:`blip.runs.tensorboard.TensorBoardLog`."""
    return Trainer(cfg, out or default_run_dir(cfg), quiet=quiet, plots=plots,
                   hooks=hooks).run(resume)
