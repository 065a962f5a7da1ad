"""`blip reproduce BENCHMARK`: the authors' published run and ours with the same settings.

Each entry holds the authors' command line verbatim (github.com/Yujun-Shi/BLIP, commit
975e6dbc: the README's run commands and the scripts beside them), the directory it runs in,
and the benchmark (and model) of ours it corresponds to; our settings are that benchmark's
preset (presets.py, where every value is cited). ``--embedded`` runs the same settings on
the embedded stand-in of a full benchmark, where one exists (its data is not the authors':
see the stand-in's preset note).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .trainer import TrainConfig, default_run_dir, preflight, train

REPO = "github.com/Yujun-Shi/BLIP"
IC, MI = "ImageClassification/src", "miniImageNetClassification/src"


@dataclass(frozen=True)
class AuthorsRun:
    benchmark: str           # ours
    directory: str           # where in the authors' repository the command runs
    command: str             # the authors' command line, verbatim
    source: str              # where the authors wrote it
    model: str | None = None  # ours, when not the preset's
    embedded: str | None = None  # the embedded stream of the same kind, if any


RUNS: dict[str, AuthorsRun] = {
    "mnist5": AuthorsRun(
        "mnist5", IC, "python run_blip.py --approach blip --experiment mnist5 --lr 0.01 "
        "--sbatch 64 --F-prior 1e-15 --nepochs 200", "README.md, 'To run BLIP with MNIST-5'",
        embedded="mnist5k-split"),
    "pmnist": AuthorsRun(
        "pmnist", IC, "python run_blip.py --approach blip --experiment pmnist --lr 0.01 "
        "--sbatch 64 --F-prior 1e-15 --nepochs 200",
        "README.md, 'To run BLIP with PMNIST' (and ImageClassification/src/run_mnist.sh:1)",
        embedded="mnist5k-perm"),
    "cifar-alt": AuthorsRun(
        "cifar-alt", IC, "python run_blip.py --experiment cifar --lr 0.05 --sbatch 32 "
        "--F-prior 5e-16 --mul 2", "README.md, 'To run BLIP with Alternating Cifar10/100' "
        "(and ImageClassification/src/run_cifar_alt.sh:1)"),
    "mixture5": AuthorsRun(
        "mixture5", IC, "python run_blip.py --experiment mixture5 --lr 0.05 --sbatch 32 "
        "--F-prior 5e-17 --mul 0.8 --seed 0", "README.md, 'To run BLIP with Sequence of 5 "
        "datasets' (and ImageClassification/src/run_mixture.sh:1)"),
    "miniimagenet": AuthorsRun(
        "miniimagenet", MI, "python run_blip.py --F-prior 5e-16 --lr 0.01 --momentum 0.0 "
        "--mul 1 --sbatch 32 --seed 0 --ntasks 20 --arch alexnet",
        "README.md, 'To run BLIP with AlexNet' (mini-ImageNet)"),
    "miniimagenet-resnet": AuthorsRun(
        "miniimagenet", MI, "python run_blip.py --F-prior 1e-16 --lr 0.01 --momentum 0.0 "
        "--mul 1.5 --sbatch 32 --seed 0 --ntasks 20 --arch resnet",
        "README.md, 'To run BLIP with ResNet-18' (mini-ImageNet)", model="resnet18"),
}

#: settings a user may change; any change is reported as a difference from the authors' run
OVERRIDES = ("epochs", "n_tasks")


def authors_command(run: AuthorsRun, seed: int) -> str:
    """Their command line, with ``--seed`` set to ``seed`` when it is not their default 0."""
    cmd = run.command
    if "--seed" in cmd:
        return re.sub(r"--seed \d+", f"--seed {seed}", cmd)
    return cmd if seed == 0 else f"{cmd} --seed {seed}"


def config(name: str, embedded: bool = False, **settings: Any) -> TrainConfig:
    """Our config for the authors' run ``name`` (``settings``: seed, device, data_dir, ...
    and the OVERRIDES; None values are left at the preset's)."""
    if name not in RUNS:
        raise ValueError(f"no authors' run {name!r}; choose one of {', '.join(RUNS)}")
    run = RUNS[name]
    cfg = TrainConfig.from_preset(run.benchmark, run.model, method="blip", **settings)
    if embedded:
        if run.embedded is None:
            with_stand_in = [k for k, r in RUNS.items() if r.embedded]
            raise ValueError(f"--embedded: {name!r} has no embedded stand-in (those with one: "
                             f"{', '.join(with_stand_in)})")
        cfg.benchmark = run.embedded
    return cfg


def describe(name: str, cfg: TrainConfig, embedded: bool = False) -> str:
    """What `blip reproduce` prints: the authors' command, ours, and every difference."""
    run = RUNS[name]
    preset = TrainConfig.from_preset(run.benchmark, run.model, method="blip", seed=cfg.seed)
    keys = [f.name for f in fields(TrainConfig) if f.name in TrainConfig.RESULT_KEYS]
    ours = " ".join(f"{k}={getattr(cfg, k)!r}" for k in keys if k != "method_kwargs")
    lines = [
        f"authors' run ({REPO}, in {run.directory}; {run.source}):",
        f"  {authors_command(run, cfg.seed)}",
        f"ours (blip train with the {run.benchmark!r} preset, every value cited in "
        "blip/classification/presets.py):",
        f"  {ours}",
        f"  method hyper-parameters: {cfg.method_kwargs}",
    ]
    diffs = [f"{k}={getattr(cfg, k)!r} (theirs {getattr(preset, k)!r})" for k in OVERRIDES
             if getattr(cfg, k) != getattr(preset, k)]
    if embedded:
        diffs.insert(0, f"data: the embedded {cfg.benchmark!r} stream, not the authors' "
                        f"{run.benchmark} files (see its preset's note)")
    lines.append("differs from the authors' run: " + ("; ".join(diffs) if diffs else
                                                      "nothing set here (see the preset notes "
                                                      "for loader and model differences)"))
    return "\n".join(lines)


def reproduce(name: str, *, embedded: bool = False, dry_run: bool = False,
              out: str | Path | None = None, quiet: bool = False, plots: bool = True,
              **settings: Any) -> tuple[str, dict | None]:
    """Describe (and unless ``dry_run``, run) the authors' run ``name``; returns the text
    printed first and the results (None for a dry run). A dry run loads no data."""
    cfg = config(name, embedded, **settings)
    preflight(cfg)
    text = describe(name, cfg, embedded)
    if dry_run:
        return text, None
    print(text, flush=True)
    return text, train(cfg, out or default_run_dir(cfg), quiet=quiet, plots=plots)
