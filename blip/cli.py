"""Command line: `blip train | compare | report | methods | presets | rl`."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Sequence
from typing import Any

TRUST_HELP = ("unpickle data files (CIFAR batches, mini-ImageNet .pkl) and checkpoints of "
              "older blip versions without restriction: only for files you trust (by default "
              "only numpy arrays and plain containers are read from them)")

# The commands and their one-line help: `blip --help` is answered from this table alone,
# without importing torch (main builds the full parser only once a command is named).
COMMANDS = {
    "train": "learn a task stream; writes a run directory",
    "report": "summarise run directories (several: a comparison table)",
    "compare": "run (or reuse) several methods over seeds; one table",
    "presets": "print the per-benchmark presets",
    "methods": "list the methods with their hyper-parameters and defaults",
    "rl": "continual RL: PPO on a sequence of Atari/MinAtar games",
    "reproduce": "the authors' run of a benchmark: their command line, then ours with the "
                 "same settings",
}
TENSORBOARD_HELP = ("write TensorBoard events to OUT/tensorboard (needs the tensorboard "
                    "package: pip install tensorboard)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip", description="Continual learning with BLIP.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_report(sub)
    _add_compare(sub)
    sub.add_parser("presets", help=COMMANDS["presets"])
    sub.add_parser("methods", help=COMMANDS["methods"])
    _add_rl(sub)
    _add_reproduce(sub)
    return p


# Choices come from the registries: a new method, benchmark or suite needs no edit here.


def _add_train(sub: Any) -> None:
    from .classification.data import BENCHMARKS
    from .classification.step import COMPILE_MODES
    from .methods import method_names

    t = sub.add_parser("train", help=COMMANDS["train"],
                       description="Learn a sequence of classification tasks. Unset options "
                       "take the benchmark's preset (the published hyperparameters).")
    t.add_argument("--benchmark", default="pdigits", choices=BENCHMARKS)
    t.add_argument("--method", default="blip",
                   help=f"blip (default), {', '.join(m for m in method_names() if m != 'blip')}"
                   " (blip:<variant>: the opt-in allocation variants, docs/blip-study.md)")
    t.add_argument("--model", choices=["mlp", "alexnet", "resnet18"], default=None)
    t.add_argument("--epochs", type=int, help="epoch budget per task")
    t.add_argument("--lr", type=float, help="initial learning rate")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--hidden", type=int, help="MLP hidden width")
    t.add_argument("--n-hidden-layers", type=int)
    t.add_argument("--width", type=float, help="conv-net width multiplier")
    t.add_argument("--F-prior", "--f-prior", dest="F_prior", type=float,
                   help="BLIP's Fisher prior (same as --hp F_prior=...; default: the preset's)")
    t.add_argument("--max-bit", type=int, help="BLIP's bits per weight (same as --hp max_bit=...)")
    t.add_argument("--lr-patience", type=int, help="epochs without improvement before lr/factor")
    t.add_argument("--lr-factor", type=float)
    t.add_argument("--lr-min", type=float, help="stop a task once lr falls below this")
    t.add_argument("--momentum", type=float)
    t.add_argument("--n-tasks", type=int, help="learn only the first N tasks")
    t.add_argument("--stop-on-nonfinite", action=argparse.BooleanOptionalAction, default=None,
                   help="at a NaN/Inf loss stop the task and restore its best epoch, as the "
                   "authors' code (default: the preset's; on for the authors' benchmarks)")
    t.add_argument("--forward-mode", choices=["continuous", "quantized"],
                   help="BLIP forward: continuous weights (authors' code) or quantize-STE "
                   "(same as --hp forward_mode=...)")
    t.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE",
                   help="a method hyper-parameter (repeatable), e.g. --hp lamb=100; "
                   "`blip methods` lists each method's names and defaults")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    t.add_argument("--threads", type=int, help="CPU threads for torch (preset default)")
    t.add_argument("--out", help="run directory (default runs/<benchmark>-<method>-seed<k>)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--data-dir", help="root of the full benchmarks' files (default ./data "
                   "or $BLIP_DATA_DIR)")
    t.add_argument("--download", action="store_true",
                   help="fetch missing full-benchmark files with torchvision")
    t.add_argument("--trust-pickles", action="store_true", help=TRUST_HELP)
    t.add_argument("--no-plots", action="store_true")
    t.add_argument("--quiet", action="store_true", help="no progress bars or per-task lines")
    t.add_argument("--compile", nargs="?", const="inductor", choices=COMPILE_MODES,
                   help="the training step: off (default: no compiler; an MLP with a "
                   "method of the base step hooks runs the fused autograd-free step, "
                   "bit-identical, others the autograd step), eager (always the autograd "
                   "step), torch.compile'd forward+backward (inductor, the "
                   "default of a bare --compile; aot_eager), or cudagraph (the whole step "
                   "captured; on CPU a stand-in replaying it eagerly)")
    t.add_argument("--tensorboard", action="store_true", help=TENSORBOARD_HELP)
    t.add_argument("--nproc", type=int, help="train on N processes of this machine with "
                   "DistributedDataParallel (starts torchrun's agent: the same as `torchrun "
                   "--standalone --nproc-per-node N -m blip train ...`); gloo on CPU, NCCL "
                   "and one GPU per process with --device cuda")


def _add_report(sub: Any) -> None:
    r = sub.add_parser("report", help=COMMANDS["report"])
    r.add_argument("runs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--json", action="store_true", help="print the results as JSON instead")


def _add_compare(sub: Any) -> None:
    from .classification.data import BENCHMARKS

    c = sub.add_parser("compare", help=COMMANDS["compare"],
                       description="Run every method for every seed on one benchmark (reusing "
                       "finished runs with the same settings in OUT, in --reuse DIRs and "
                       "under runs/), then write OUT/compare.md, OUT/compare.csv and "
                       "OUT/compare_accuracy.png.")
    c.add_argument("--benchmark", default="pdigits", choices=BENCHMARKS)
    c.add_argument("--methods", default="blip,finetune,freeze",
                   help="comma-separated method names (default blip,finetune,freeze)")
    c.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    c.add_argument("--out", help="directory of the runs and tables (default runs/compare-<bench>)")
    c.add_argument("--epochs", type=int, help="epoch budget per task (default: preset)")
    c.add_argument("--n-tasks", type=int, help="learn only the first N tasks")
    c.add_argument("--data-dir", help="root of the full benchmarks' files")
    c.add_argument("--trust-pickles", action="store_true", help=TRUST_HELP)
    c.add_argument("--hp", action="append", default=[], metavar="[METHOD:]NAME=VALUE",
                   help="a method hyper-parameter (repeatable): METHOD:NAME=VALUE for one "
                   "method, NAME=VALUE for every listed method that accepts NAME")
    c.add_argument("--no-plots", action="store_true")
    c.add_argument("--reuse", nargs="+", default=[], metavar="DIR",
                   help="also reuse finished runs with the same settings from these run "
                   "directories (or folders of them); runs/ is always searched")
    c.add_argument("--tensorboard", action="store_true", help=TENSORBOARD_HELP + " of each run")


def _add_rl(sub: Any) -> None:
    from .rl.envs import SUITES
    from .rl.methods import METHODS as RL_METHODS

    rl = sub.add_parser("rl", help=COMMANDS["rl"],
                        description="Learn a suite's games in sequence with PPO and a "
                        "continual-learning method; writes a run directory with the reward "
                        "matrix, plots and GIFs. With --compare: a table of finished runs.")
    rl.add_argument("--suite", default="minatar5", choices=sorted(SUITES))
    rl.add_argument("--method", default="blip", choices=list(RL_METHODS))
    rl.add_argument("--steps", type=int, help="env steps per game (default: 10M atari6, "
                    "1M minatar5)")
    rl.add_argument("--envs", type=int, default=16, help="parallel envs (default 16)")
    rl.add_argument("--n-steps", type=int, default=125, help="steps per env and rollout")
    rl.add_argument("--games", type=int, help="learn only the first N games")
    rl.add_argument("--lr", type=float, default=2.5e-4)
    rl.add_argument("--F-prior", "--f-prior", dest="F_prior", type=float,
                    help="BLIP's Fisher prior (default 5e-18, the Atari preset)")
    rl.add_argument("--lamb", type=float, help="EWC's lambda (default 5000)")
    rl.add_argument("--eval-episodes", type=int, default=8, help="episodes per game and eval")
    rl.add_argument("--eval-max-steps", type=int, help="cap of an eval episode, agent steps")
    rl.add_argument("--gif-frames", type=int, default=60, help="frames per GIF clip (0: none)")
    rl.add_argument("--checkpoint-every", type=int, default=50, help="updates between "
                    "mid-game checkpoints (0: only after each game)")
    rl.add_argument("--seed", type=int, default=0)
    rl.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    rl.add_argument("--threads", type=int, help="torch threads and ALE worker threads "
                    "(default: 1 on minatar5, half the cores up to 8 on atari6)")
    rl.add_argument("--out", help="run directory (default runs/rl-<suite>-<method>-seed<k>)")
    rl.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    rl.add_argument("--trust-pickles", action="store_true", help=TRUST_HELP)
    rl.add_argument("--no-plots", action="store_true")
    rl.add_argument("--quiet", action="store_true")
    rl.add_argument("--tensorboard", action="store_true", help=TENSORBOARD_HELP)
    rl.add_argument("--smoke", action="store_true",
                    help="a quick check that everything runs: 2 games, 2 short rollouts each, "
                    "1 eval episode of at most 200 steps (options you give still win)")
    rl.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                    help="instead of training: compare finished runs (table; with --out, "
                    "also OUT/compare.md and OUT/compare.png)")
    # --smoke replaces only the options left at these defaults
    rl.set_defaults(rl_defaults=dict(vars(rl.parse_args([]))))


def _add_reproduce(sub: Any) -> None:
    from .classification.reproduce import RUNS

    r = sub.add_parser("reproduce", help=COMMANDS["reproduce"],
                       description="Print the authors' command line for BENCHMARK (from "
                       "their README and scripts) and our settings, then train with them.")
    r.add_argument("benchmark", choices=list(RUNS), metavar="BENCHMARK",
                   help=f"one of {', '.join(RUNS)}")
    r.add_argument("--dry-run", action="store_true", help="print only (loads no data)")
    r.add_argument("--embedded", action="store_true", help="the same settings on the "
                   "embedded stand-in (mnist5 -> mnist5k-split, pmnist -> mnist5k-perm)")
    r.add_argument("--epochs", type=int, help="epoch budget (differs from the authors')")
    r.add_argument("--n-tasks", type=int, help="only the first N tasks (differs from theirs)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    r.add_argument("--threads", type=int)
    r.add_argument("--data-dir", help="root of the full benchmarks' files")
    r.add_argument("--trust-pickles", action="store_true", help=TRUST_HELP)
    r.add_argument("--out", help="run directory (default runs/<benchmark>-blip-seed<k>)")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--quiet", action="store_true")


def _reproduce(a: argparse.Namespace) -> int:
    from .classification.reproduce import reproduce

    text, _ = reproduce(a.benchmark, embedded=a.embedded, dry_run=a.dry_run, out=a.out,
                        quiet=a.quiet, plots=not a.no_plots, epochs=a.epochs,
                        n_tasks=a.n_tasks, seed=a.seed, device=a.device, threads=a.threads,
                        data_dir=a.data_dir, trust_pickles=a.trust_pickles)
    if a.dry_run:
        print(text)
    return 0


def parse_hp(items: Sequence[str]) -> dict[str, Any]:
    """``["lamb=100", "penalty_step=gradient"]`` -> ``{"lamb": 100, ...}`` (Python literals
    where they parse, else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--hp takes NAME=VALUE; got {item!r}")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        out[name.strip()] = value
    return out


def compare_hp(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per-method hyper-parameters from ``[METHOD:]NAME=VALUE`` items (see `compare --hp`)."""
    from .methods import method_class, method_names

    per: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item in items:
        head, _, rest = item.partition("=")
        target, colon, name = head.rpartition(":")
        (hp,) = parse_hp([f"{name if colon else head}={rest}"]).items()
        if colon:
            if target not in per:
                raise ValueError(f"--hp {item!r}: method {target!r} is not in --methods")
            per[target][hp[0]] = hp[1]
            continue
        takers = [m for m in methods
                  if m in method_names() and hp[0] in method_class(m).HPARAMS]
        if not takers:
            raise ValueError(f"--hp {item!r}: none of the methods {list(methods)} accepts "
                             f"{hp[0]!r} (see `blip methods`)")
        for m in takers:
            per[m][hp[0]] = hp[1]
    return per


def _methods_text() -> str:
    from .methods import METHODS

    lines = []
    for name, cls in METHODS.items():
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        lines.append(f"{name}: {doc}")
        lines += [f"    {k} = {v!r}" for k, v in cls.HPARAMS.items()]
        lines += [f"  {name}:{v}: {', '.join(f'{k}={x!r}' for k, x in hp.items())}"
                  for v, hp in cls.VARIANTS.items()]
    return "\n".join(lines)


def _train(a: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    from .classification import ddp
    from .classification.trainer import TrainConfig, default_run_dir, preflight, train

    launch = a.nproc is not None and not ddp.launched_by_torchrun()
    if launch:
        ddp.check_nproc(a.nproc)
    method_kwargs = parse_hp(a.hp)
    # the BLIP flags are sugar for --hp (an explicit --hp of the same name wins)
    for name in ("F_prior", "max_bit", "forward_mode"):
        if getattr(a, name) is not None:
            method_kwargs.setdefault(name, getattr(a, name))
    cfg = TrainConfig.from_preset(
        a.benchmark, a.model, method=a.method, epochs=a.epochs, lr=a.lr,
        batch_size=a.batch_size, hidden=a.hidden, n_hidden_layers=a.n_hidden_layers,
        width=a.width, lr_patience=a.lr_patience,
        lr_factor=a.lr_factor, lr_min=a.lr_min, momentum=a.momentum, n_tasks=a.n_tasks,
        seed=a.seed, device=a.device, threads=a.threads, data_dir=a.data_dir, download=a.download,
        method_kwargs=method_kwargs, trust_pickles=a.trust_pickles,
        stop_on_nonfinite=a.stop_on_nonfinite, compile=a.compile,
    )
    if launch and a.nproc > 1:  # checked here first; each worker runs this command again
        preflight(cfg)
        return ddp.launch(a.nproc, argv)
    out = a.out or default_run_dir(cfg)
    train(cfg, out, resume=a.resume, quiet=a.quiet, plots=not a.no_plots,
          hooks=_tensorboard_hooks(a.tensorboard and ddp.env_rank() == 0, out))
    ddp.leave()  # torchrun's workers end together (ddp.leave)
    return 0


def _tensorboard_hooks(wanted: bool, out: Any) -> list[Any]:
    """``[TensorBoardLog(out)]`` with --tensorboard (a clear error now, before training,
    when the package is missing), else ``[]``."""
    if not wanted:
        return []
    from .runs.tensorboard import TensorBoardLog

    return [TensorBoardLog(out)]


def _compare(a: argparse.Namespace) -> int:
    from .classification.compare import compare

    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers; got {a.seeds!r}") from None
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    overrides = {k: v for k, v in (("epochs", a.epochs), ("n_tasks", a.n_tasks),
                                   ("data_dir", a.data_dir)) if v is not None}
    if a.trust_pickles:
        overrides["trust_pickles"] = True
    out = a.out or f"runs/compare-{a.benchmark}"
    if a.tensorboard:
        from .runs.tensorboard import require

        require()  # before the first run trains
    print(compare(a.benchmark, methods, seeds, out, plots=not a.no_plots,
                  hparams=compare_hp(a.hp, methods), reuse=a.reuse,
                  hooks=(lambda d: _tensorboard_hooks(True, d)) if a.tensorboard else None,
                  progress=sys.stderr.isatty(), **overrides))
    return 0


def _rl(a: argparse.Namespace) -> int:
    from .classification.ddp import single_process_only

    single_process_only("rl")
    from .rl.ppo import PPOConfig
    from .rl.report import compare_runs
    from .rl.runner import RLConfig, run_rl

    if a.compare:
        print(compare_runs(a.compare, a.out, plots=not a.no_plots))
        return 0
    if a.smoke:
        from .rl.runner import SMOKE

        for k, v in SMOKE.items():
            if getattr(a, k) == a.rl_defaults[k]:
                setattr(a, k, v)
    given = {k: v for k, v in (("F_prior", a.F_prior), ("lamb", a.lamb)) if v is not None}
    cfg = RLConfig(
        suite=a.suite, method=a.method, steps=a.steps, envs=a.envs, games=a.games, seed=a.seed,
        device=a.device, threads=a.threads, eval_episodes=a.eval_episodes,
        eval_max_steps=a.eval_max_steps, gif_frames=a.gif_frames,
        checkpoint_every=a.checkpoint_every, ppo=PPOConfig(lr=a.lr, n_steps=a.n_steps),
        trust_pickles=a.trust_pickles, **given,
    )
    from .rl.runner import default_run_dir

    out = a.out or default_run_dir(cfg)
    run_rl(cfg, out, resume=a.resume, quiet=a.quiet, plots=not a.no_plots,
           hooks=_tensorboard_hooks(a.tensorboard, out))
    return 0


def _light_parser() -> argparse.ArgumentParser:
    """The command names and their help only: what --help, no command or an unknown one
    need, in milliseconds instead of the seconds torch takes to import."""
    p = argparse.ArgumentParser(prog="blip", description="Continual learning with BLIP.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _light_parser().parse_args(argv)  # prints the help or the usage error and exits
    a = _parser().parse_args(argv)
    from .classification.data import DataFormatError

    try:
        if a.command == "train":
            return _train(a, argv)
        if a.command == "compare":
            return _compare(a)
        if a.command == "report":
            from .classification.report import load_results, report

            if a.json:
                print(json.dumps({d: load_results(d) for d in a.runs}, indent=1))
            else:
                print(report(a.runs))
            return 0
        if a.command == "rl":
            return _rl(a)
        if a.command == "reproduce":
            return _reproduce(a)
        if a.command == "presets":
            from .classification.presets_table import presets_table

            print(presets_table())
            return 0
        if a.command == "methods":
            print(_methods_text())
            return 0
    except (ValueError, OSError, TypeError, DataFormatError) as e:
        # user errors (bad option values, bad or missing files) and I/O failures (disk
        # full, read-only): one clear line naming the path, no traceback
        print(f"blip {a.command}: error: {e}", file=sys.stderr)
        if a.command == "train":
            from .classification import ddp

            ddp.abandon()  # a torchrun worker's group ends here, not in its destructor
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
