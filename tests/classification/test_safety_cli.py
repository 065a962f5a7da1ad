"""Every setting of a run is checked, named, before any training (issue 11 findings 7,
8, 11, 13, 14): finite in float32, bools refused, ranges; `--out` writable; report and
rl --compare on the wrong kind of run dir; repeated seeds."""

from __future__ import annotations

import errno
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest

import blip_kernels
from blip import cli
from blip.classification.trainer import TrainConfig, Trainer


@pytest.mark.parametrize(("field", "value"), [
    ("lr", 1e39), ("lr", math.nan), ("lr", "0.1"), ("epochs", True), ("epochs", 0),
    ("batch_size", 2.5), ("momentum", math.nan), ("momentum", None), ("lr_factor", math.inf),
    ("lr_min", 0.0), ("F_prior", 1e39), ("F_prior", 1e-50), ("width", math.inf),
    ("seed", True), ("max_bit", True), ("threads", 0),
])
def test_train_config_checked_before_training(tmp_path: Path, field: str, value: object) -> None:
    cfg = TrainConfig.from_preset("pdigits", n_tasks=2, epochs=1)
    if field in ("F_prior", "max_bit"):  # BLIP's settings: method hyper-parameters
        cfg.method_kwargs = {**cfg.method_kwargs, field: value}
    else:
        assert hasattr(cfg, field), field
        setattr(cfg, field, value)
    with pytest.raises(ValueError, match=rf"{field} must be"):
        Trainer(cfg, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(("extra", "named"), [
    (["--hidden", "100000000000"], "hidden"), (["--threads", "100000000000000000000"], "threads"),
    (["--threads", "5000"], "threads"), (["--seed", "-1"], "seed"),
    (["--seed", str(2**32)], "seed"), (["--width", "1e6"], "width"),
])
def test_cli_bounds_named_in_one_line(tmp_path: Path, capsys, extra: list[str],  # noqa: ANN001
                                      named: str) -> None:
    # before: an allocation traceback, torch's "Overflow when unpacking long long", numpy's
    # seed message naming no option, an unbounded width
    argv = _train(tmp_path / "run", *extra)
    if named == "width":
        argv += ["--benchmark", "pmnist", "--model", "alexnet"]
        argv = argv[:1] + argv[3:]  # the last --benchmark wins; keep one
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"{named} must be" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_rl_seed_and_threads_bounded() -> None:
    from blip.rl.runner import RLConfig

    for field, value in (("seed", -1), ("seed", 2**32), ("threads", 10**20)):
        with pytest.raises(ValueError, match=rf"{field} must be an int"):
            RLConfig(**{field: value}).validate()


def test_model_too_big_for_memory_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from blip import models
    from blip.classification import trainer

    def no_memory(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 17179869184 bytes")

    monkeypatch.setattr(models, "MLP", no_memory)
    cfg = TrainConfig.from_preset("pdigits", hidden=65536, n_tasks=2)

    class Stream:
        classes_per_task, in_features, input_shape = [2, 2], 64, (64,)

    with pytest.raises(ValueError, match=r"'mlp' with hidden=65536.*does not fit in memory"):
        trainer.build_model(cfg, Stream())


def _train(out: Path, *extra: str) -> list[str]:
    return ["train", "--benchmark", "pdigits", "--n-tasks", "2", "--epochs", "1", "--quiet",
            "--no-plots", "--out", str(out), *extra]


@pytest.mark.parametrize(("extra", "named"), [
    (["--lr", "1e39"], "lr"), (["--momentum", "nan"], "momentum"),
    (["--method", "ewc", "--momentum", "nan"], "momentum"),
    (["--method", "finetune", "--hp", "weight_decay=True"], "weight_decay"),
    (["--method", "si", "--hp", "momentum=True"], "momentum"),
    (["--method", "ewc", "--hp", "lamb=1e39"], "lamb"),
    (["--method", "hat", "--hp", "s_max=inf"], "s_max"),
])
def test_cli_refuses_bad_numbers_in_one_line(tmp_path: Path, capsys, extra: list[str],  # noqa: ANN001
                                            named: str) -> None:
    rc = cli.main(_train(tmp_path / "run", *extra))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"{named} must be" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("kind", ["file", "under-a-file", "read-only"])
def test_out_checked_before_training(tmp_path: Path, capsys, kind: str,  # noqa: ANN001
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "blocker"
    if kind == "read-only":  # (root ignores chmod: the file system's refusal is simulated)
        def refuse(*a, **k):  # noqa: ANN002, ANN003, ANN202
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
        out = blocker
    else:
        blocker.write_text("not a directory")
        out = blocker if kind == "file" else blocker / "run"
    called = []

    class Spy(Trainer):
        def train_task(self, *a, **k):  # noqa: ANN002, ANN003, ANN202
            called.append(1)
            return super().train_task(*a, **k)

    with pytest.raises(ValueError, match=r"out directory .*blocker"):
        Spy(TrainConfig.from_preset("pdigits", n_tasks=2, epochs=1), out, quiet=True).run()
    assert not called
    rc = cli.main(_train(out))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "blocker" in err and len(err.splitlines()) == 1


def test_compare_refuses_repeated_seeds(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    rc = cli.main(["compare", "--methods", "finetune", "--seeds", "0,0", "--epochs", "1",
                   "--n-tasks", "2", "--out", str(tmp_path / "cmp"), "--no-plots"])
    err = capsys.readouterr().err
    assert rc == 2 and "seeds must not repeat" in err
    assert not (tmp_path / "cmp" / "pdigits-finetune-seed0").exists()


def test_compare_checks_every_run_before_the_first(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    rc = cli.main(["compare", "--methods", "finetune,ewc", "--seeds", "0", "--epochs", "1",
                   "--n-tasks", "2", "--out", str(tmp_path / "cmp"), "--no-plots",
                   "--hp", "ewc:lamb=inf"])
    assert rc == 2 and "lamb must be" in capsys.readouterr().err
    assert not (tmp_path / "cmp" / "pdigits-finetune-seed0").exists()


# -- report / rl --compare on the wrong files ---------------------------------------------


@pytest.fixture(scope="module")
def train_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    assert cli.main(_train(out)) == 0
    return out


def test_results_record_the_kernel_backend(train_run: Path) -> None:
    r = json.loads((train_run / "results.json").read_text())
    assert r["kernel_backend"] == blip_kernels.current_backend("cpu")
    with blip_kernels.use_backend("reference"):
        assert cli.main(_train(train_run.parent / "ref")) == 0
    r = json.loads((train_run.parent / "ref" / "results.json").read_text())
    assert r["kernel_backend"] == "reference"


def _rl_like(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps({
        "suite": "minatar5", "method": "blip", "games": ["Breakout"], "games_done": 1,
        "complete": True, "reward_matrix": [[1.0]], "reward_matrix_norm": [[1.0]],
        "final_mean_norm": 1.0}))
    return d


@pytest.mark.parametrize("damage", ["rl-dir", "empty", "list", "bad-matrix", "bad-json",
                                    "missing-seed"])
def test_report_on_wrong_or_malformed_results(train_run: Path, tmp_path: Path, capsys,  # noqa: ANN001
                                              damage: str) -> None:
    d = tmp_path / "run"
    if damage == "rl-dir":
        _rl_like(d)
        want = "blip rl --compare"
    else:
        shutil.copytree(train_run, d)
        r = json.loads((d / "results.json").read_text())
        text = {"empty": "{}", "list": "[1, 2]", "bad-json": "{\"acc\": ",
                "bad-matrix": json.dumps({**r, "acc_matrix": [["x"]]}),
                "missing-seed": json.dumps({**r, "config": {}})}[damage]
        (d / "results.json").write_text(text)
        want = "results.json"
    for argv in (["report", str(d)], ["report", str(d), str(train_run)]):
        rc = cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and want in err and str(d) in err, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("damage", ["train-dir", "empty", "bad-matrix"])
def test_rl_compare_on_wrong_or_malformed_results(train_run: Path, tmp_path: Path, capsys,  # noqa: ANN001
                                                  damage: str) -> None:
    if damage == "train-dir":
        d, want = train_run, "blip report"
    else:
        d = _rl_like(tmp_path / "rl")
        r = json.loads((d / "results.json").read_text())
        (d / "results.json").write_text("{}" if damage == "empty" else json.dumps(
            {**r, "reward_matrix": "x"}))
        want = "results.json"
    rc = cli.main(["rl", "--compare", str(d), "--no-plots"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and want in err and str(d) in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
