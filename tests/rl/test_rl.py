"""Continual RL (blip.rl): env wrappers, PPO, the BLIP path, smoke runs, resume."""

from __future__ import annotations

import json
import re
import shutil
import sys
import types

import numpy as np
import pytest
import torch

import blip_kernels
from blip.rl.agent import build_agent
from blip.rl.envs import ALE_PY_MIN_VERSION, SUITES, MissingDependencyError, make_env, version_tuple
from blip.rl.methods import BLIPMethod, make_method
from blip.rl.ppo import Batch, PPOConfig, collect, gae, make_batch, ppo_loss, ppo_update
from blip.rl.runner import CHECKPOINT, RLConfig, RLRunner
from blip.runs.checkpoint import load as load_checkpoint

ATARI_ACTIONS = {"KungFuMaster": 14, "Boxing": 18, "Jamesbond": 18, "Krull": 18,
                 "Riverraid": 18, "SpaceInvaders": 6}
MINATAR_ACTIONS = {"Breakout": 3, "SpaceInvaders": 4, "Freeway": 3, "Asterix": 5,
                   "Seaquest": 6}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _need(suite: str) -> None:
    pytest.importorskip("ale_py" if suite == "atari6" else "minatar")


# -- environments --------------------------------------------------------------------------


@pytest.mark.parametrize("game", SUITES["atari6"])
def test_atari_env_shapes_and_action_sets(game: str) -> None:
    _need("atari6")
    env = make_env("atari6", game, 2, 0, num_threads=1)
    try:
        obs = env.reset()
        assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
        assert env.n_actions == ATARI_ACTIONS[game]
        step = env.step(np.zeros(2, dtype=np.int64))
        assert step.obs.shape == (2, 4, 84, 84)
        assert step.reward.shape == step.done.shape == step.episode_over.shape == (2,)
        assert env.frame(step.obs).shape == (84, 84, 3)
    finally:
        env.close()


@pytest.mark.parametrize("game", SUITES["minatar5"])
def test_minatar_env_shapes_padding_and_action_sets(game: str) -> None:
    _need("minatar5")
    env = make_env("minatar5", game, 3, 0)
    obs = env.reset()
    assert obs.shape == (3, 10, 10, 10) and obs.dtype == np.uint8
    assert env.n_actions == MINATAR_ACTIONS[game]
    assert not obs[:, env.channels:].any()  # padding channels stay empty
    rng = np.random.default_rng(0)
    for _ in range(50):
        step = env.step(rng.integers(0, env.n_actions, 3))
    assert step.obs.shape == (3, 10, 10, 10)
    assert env.frame(step.obs).shape == (80, 80, 3)


def test_minatar_seeding_is_deterministic() -> None:
    _need("minatar5")

    def trace(seed: int) -> list[float]:
        env = make_env("minatar5", "Asterix", 2, seed)
        env.reset()
        out = []
        for t in range(300):
            s = env.step(np.array([t % 5, (3 * t) % 5]))
            out.append(float(s.obs.sum()) + float(s.reward.sum()))
        return out

    assert trace(3) == trace(3)
    assert trace(3) != trace(4)


def test_atari_life_loss_is_a_cut_not_an_episode_end() -> None:
    _need("atari6")
    env = make_env("atari6", "SpaceInvaders", 1, 0, num_threads=1)
    env.reset()
    cuts = overs = 0
    for _ in range(1500):
        s = env.step(np.array([1]))  # keep firing: lives get lost
        cuts += int(s.done[0] and not s.episode_over[0])
        overs += int(s.episode_over[0])
    env.close()
    assert cuts >= 1  # a lost life cut the return (GAE) but the game went on
    assert len(env.drain()) == overs


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="suite"):
        make_env("atari7", "Boxing", 1, 0)
    with pytest.raises(ValueError, match="game"):
        make_env("minatar5", "Pong", 1, 0)
    with pytest.raises(ValueError, match="num_envs"):
        make_env("minatar5", "Breakout", 0, 0)
    for kwargs, name in [({"method": "sgd"}, "method"), ({"envs": 0}, "envs"),
                         ({"games": 9}, "games"), ({"steps": 0}, "steps"),
                         ({"ppo": PPOConfig(clip=0)}, "clip")]:
        with pytest.raises(ValueError, match=name):
            RLConfig(**kwargs).validate()


def test_steps_below_one_rollout_is_refused_and_others_round_down() -> None:
    # one rollout = envs * n_steps = 4 * 32 = 128 env steps
    with pytest.raises(ValueError, match=r"steps must be at least one rollout.* = 128; got 127"):
        RLConfig(steps=127, envs=4, ppo=PPOConfig(n_steps=32)).validate()
    cfg = RLConfig(steps=300, envs=4, ppo=PPOConfig(n_steps=32))
    cfg.validate()
    assert (cfg.n_updates(), cfg.actual_steps_per_game()) == (2, 256)
    cfg = RLConfig(steps=128, envs=4, ppo=PPOConfig(n_steps=32))
    assert (cfg.n_updates(), cfg.actual_steps_per_game()) == (1, 128)


def test_missing_or_old_dependencies_say_what_to_install(tmp_path, monkeypatch,
                                                         capsys) -> None:
    assert version_tuple("0.12.1") == ALE_PY_MIN_VERSION == (0, 12, 1)
    assert version_tuple("0.12.1rc1") == (0, 12, 1) and version_tuple("1.0.dev0") == (1, 0)
    assert version_tuple("0.9.4") < ALE_PY_MIN_VERSION <= version_tuple("0.12.10")
    assert issubclass(MissingDependencyError, ValueError)  # the CLI reports it (exit 2)
    rl_extra = re.escape('pip install -e ".[rl]"')
    monkeypatch.setitem(sys.modules, "minatar", None)  # import minatar fails
    with pytest.raises(MissingDependencyError, match="pip install --no-deps minatar"):
        make_env("minatar5", "Breakout", 1, 0)
    monkeypatch.setitem(sys.modules, "ale_py", None)
    with pytest.raises(MissingDependencyError, match=rl_extra):
        make_env("atari6", "Boxing", 1, 0)
    monkeypatch.setitem(sys.modules, "ale_py", types.SimpleNamespace(__version__="0.11.2"))
    with pytest.raises(MissingDependencyError,
                       match=r"ale-py >= 0\.12\.1 .*ale-py 0\.11\.2 is installed.*" + rl_extra):
        make_env("atari6", "Boxing", 1, 0)
    monkeypatch.setitem(sys.modules, "ale_py", types.SimpleNamespace(__version__="0.12.1"))
    monkeypatch.setitem(sys.modules, "ale_py.vector_env", None)  # as without gymnasium
    with pytest.raises(MissingDependencyError, match="gymnasium.*" + rl_extra):
        make_env("atari6", "Boxing", 1, 0)
    from blip.cli import main

    assert main(["rl", "--games", "1", "--steps", "256", "--envs", "2", "--n-steps", "64",
                 "--quiet", "--no-plots", "--gif-frames", "0", "--out", str(tmp_path / "r")]) == 2
    assert "pip install --no-deps minatar" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# -- PPO -----------------------------------------------------------------------------------


def test_gae_matches_a_hand_computation() -> None:
    r = torch.tensor([[1.0], [0.0], [1.0]])
    v = torch.tensor([[0.5], [0.2], [0.1]])
    dones = torch.tensor([[0.0], [0.0], [1.0]])  # a new episode starts at t=2
    adv, ret = gae(r, v, dones, torch.tensor([0.3]), torch.tensor([0.0]), 0.9, 0.8)
    d2 = 1.0 + 0.9 * 0.3 - 0.1
    d1 = 0.0 - 0.2  # the next state starts a new episode: no bootstrap
    d0 = 1.0 + 0.9 * 0.2 - 0.5
    a1 = d1
    a0 = d0 + 0.9 * 0.8 * a1
    assert torch.allclose(adv.squeeze(1), torch.tensor([a0, a1, d2]))
    assert torch.allclose(ret, adv + v)


def _minatar_batch(seed: int = 0) -> tuple:
    env = make_env("minatar5", "Breakout", 8, seed)
    torch.manual_seed(seed)
    model = build_agent("minatar5", [env.n_actions], F_prior=5e-18)
    gen = torch.Generator().manual_seed(seed)
    ro, _, _ = collect(model, env, 0, env.reset(), np.zeros(8, bool), 64, gen,
                       torch.device("cpu"))
    return model, env, ro, gen


def test_ppo_update_decreases_its_loss_on_a_fixed_batch() -> None:
    _need("minatar5")
    model, _, ro, gen = _minatar_batch()
    cfg = PPOConfig(epochs=4, n_minibatches=4, lr=1e-3)
    batch = make_batch(model, ro, 0, cfg)
    # a fixed, non-trivial advantage signal so the surrogate has somewhere to go
    batch = Batch(batch.obs, batch.actions, batch.logprobs, batch.values,
                  torch.randn(len(batch), generator=torch.Generator().manual_seed(1)),
                  batch.returns + 1.0)
    with torch.no_grad():
        before = float(ppo_loss(model, 0, batch, cfg)[0])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
    stats = ppo_update(model, 0, batch, opt, cfg, gen)
    with torch.no_grad():
        after = float(ppo_loss(model, 0, batch, cfg)[0])
    assert after < before
    assert set(stats) >= {"loss", "pg_loss", "v_loss", "entropy", "clipfrac"}


def test_blip_keeps_frozen_bits_through_many_adam_steps() -> None:
    _need("minatar5")
    model, _, ro, gen = _minatar_batch()
    method = make_method("blip", model, F_prior=1e-15, max_bit=20, lamb=0.0)
    assert isinstance(method, BLIPMethod)
    end = method.end_game(0, ro.obs.flatten(0, 1), torch.Generator().manual_seed(0))
    assert end["fisher_samples"] == 512 and end["capacity"]["overall"] > 0
    layers = method.strategy.layers
    frozen = {n: (lay.weight.detach().clone(), lay.bits_weight.clone())
              for n, lay in layers.items()}
    # the next game: new heads, Adam with a large lr, projection after every step
    model2_params = method.trainable(0)
    opt = torch.optim.Adam(model2_params, lr=1e-2)
    cfg = PPOConfig(epochs=1, n_minibatches=8)
    batch = make_batch(model, ro, 0, cfg)
    for _ in range(6):
        ppo_update(model, 0, batch, opt, cfg, gen, after_step=method.after_step)
    moved = 0
    for n, lay in layers.items():
        w0, bits = frozen[n]
        w, prev, b = lay.weight.detach(), lay.prev_weight, lay.bits_weight
        assert torch.equal(b, bits)
        assert torch.equal(prev, blip_kernels.quantize(w0, b, lay.weight_bound))
        # section 4: a weight stays within one step of its frozen bits' grid point
        step = lay.weight_bound * torch.pow(2.0, -b.float())
        held = b > 0
        assert (held.any() and ((w - prev).abs()[held] <= step[held] + 1e-6).all())
        full = b == lay.max_bit
        assert torch.equal(w[full], prev[full])
        moved += int((lay.weight.detach() != w0).sum())
    assert moved > 0  # the free bits did learn


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away() -> None:
    _need("minatar5")
    model, _, ro, _ = _minatar_batch()
    method = make_method("ewc", model, F_prior=5e-18, max_bit=20, lamb=5000.0)
    assert method.penalty() is None
    method.end_game(0, ro.obs.flatten(0, 1), torch.Generator().manual_seed(0))
    assert float(method.penalty().detach()) == 0.0
    with torch.no_grad():
        for p in model.trunk.parameters():
            p.add_(0.01)
    assert float(method.penalty().detach()) > 0.0


def test_freeze_trains_only_the_heads_after_game_one() -> None:
    model = build_agent("minatar5", [3, 4], F_prior=5e-18)
    method = make_method("freeze", model, F_prior=5e-18, max_bit=20, lamb=0.0)
    assert len(method.trainable(0)) == len(list(model.trunk.parameters())) + 4
    assert len(method.trainable(1)) == 4
    assert not any(p.requires_grad for p in model.trunk.parameters())


# -- end to end ----------------------------------------------------------------------------


def _cfg(suite: str, **kw: object) -> RLConfig:
    base: dict = {"suite": suite, "games": 2, "envs": 4, "eval_episodes": 2,
                  "eval_max_steps": 60, "gif_frames": 8, "checkpoint_every": 0}
    if suite == "minatar5":
        base.update(steps=2048, ppo=PPOConfig(n_steps=128, n_minibatches=4, epochs=2))
    else:
        base.update(steps=256, eval_max_steps=30, ppo=PPOConfig(n_steps=32, n_minibatches=2,
                                                                 epochs=1))
    base.update(kw)
    return RLConfig(**base)


def _check_outputs(out, n_games: int = 2) -> dict:  # noqa: ANN001
    res = json.loads((out / "results.json").read_text())
    raw = res["reward_matrix"]
    assert len(raw) == n_games and all(raw[i][j] is not None for i in range(n_games)
                                       for j in range(i + 1))
    assert raw[0][1] is None
    csv_lines = (out / "reward_matrix.csv").read_text().splitlines()
    assert len(csv_lines) == n_games + 1
    assert (out / "reward_matrix_norm.json").is_file()
    for png in ("reward_matrix.png", "learning_curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    from PIL import Image

    with Image.open(out / "gifs" / "grid.gif") as im:
        assert im.format == "GIF" and im.n_frames > 1
    for i in range(n_games):
        for j in range(i + 1):
            assert (out / "gifs" / f"after{i}_game{j}.gif").is_file()
    return res


def test_minatar_two_game_smoke_run_writes_matrix_plots_gifs(tmp_path) -> None:
    _need("minatar5")
    pytest.importorskip("matplotlib")
    res = RLRunner(_cfg("minatar5", method="blip"), tmp_path, quiet=True).run()
    _check_outputs(tmp_path)
    assert res["complete"] and res["per_game"][0]["env_steps"] == 2048


def test_atari_two_game_smoke_run_writes_matrix_plots_gifs(tmp_path) -> None:
    _need("atari6")
    pytest.importorskip("matplotlib")
    res = RLRunner(_cfg("atari6", method="blip", threads=1), tmp_path, quiet=True).run()
    _check_outputs(tmp_path)
    assert res["games"] == ["KungFuMaster", "Boxing"]
    assert res["per_game"][1]["method"]["capacity"]["overall"] > 0


def _final(out) -> tuple[list, dict, dict]:  # noqa: ANN001
    c = load_checkpoint(out / CHECKPOINT)
    return c["state"]["raw"], c["model"], c["method"]


def _assert_same(a: object, b: object, where: str = "") -> None:
    """Nested dicts/lists/tuples of tensors and plain values are exactly equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize(("method", "stop_after"), [("blip", 1), ("blip", 4), ("ewc", 4)],
                         ids=["blip-mid-game", "blip-after-game-1", "ewc-after-game-1"])
def test_minatar_resume_gives_the_same_reward_matrix(tmp_path, method: str,
                                                      stop_after: int) -> None:
    _need("minatar5")
    kw = {"method": method, "steps": 1024, "checkpoint_every": 1, "gif_frames": 0,
          "ppo": PPOConfig(n_steps=64, n_minibatches=2, epochs=1)}  # 4 updates per game
    RLRunner(_cfg("minatar5", **kw), tmp_path / "full", quiet=True, plots=False).run()
    part = tmp_path / "part"
    stopped = RLRunner(_cfg("minatar5", **kw), part, quiet=True,
                       plots=False).run(stop_after_updates=stop_after)
    assert stopped == {"stopped": True}
    c = load_checkpoint(part / CHECKPOINT)
    if stop_after == 4:  # killed right after game 1 was learned, evaluated and saved
        assert c["mid"] is None and c["state"]["games_done"] == 1
        res = json.loads((part / "results.json").read_text())
        assert res["games_done"] == 1 and res["complete"] is False
    else:  # killed after the first update of game 1
        assert c["mid"]["update"] == 1 and c["state"]["games_done"] == 0
        assert not (part / "results.json").exists()
    res = RLRunner(_cfg("minatar5", **kw), part, quiet=True, plots=False).run(resume=True)
    assert res["complete"] and res["games_done"] == 2
    raw_full, model_full, method_full = _final(tmp_path / "full")
    raw_part, model_part, method_part = _final(part)
    assert raw_part == raw_full
    _assert_same(model_full, model_part, "model")
    _assert_same(method_full, method_part, "method")


def test_resume_refuses_other_settings(tmp_path) -> None:
    _need("minatar5")
    kw = {"steps": 512, "gif_frames": 0, "games": 1,
          "ppo": PPOConfig(n_steps=64, n_minibatches=2, epochs=1)}
    RLRunner(_cfg("minatar5", **kw), tmp_path, quiet=True, plots=False).run()
    with pytest.raises(ValueError, match="settings differ"):
        RLRunner(_cfg("minatar5", seed=1, **kw), tmp_path, quiet=True,
                 plots=False).run(resume=True)


def test_cli_rl_runs_and_compares(tmp_path, capsys) -> None:
    _need("minatar5")
    pytest.importorskip("matplotlib")
    from blip.cli import main

    out = tmp_path / "run"
    # 300 steps = 2 whole rollouts of 2 envs x 64 steps (256 env steps) + 44 left over
    args = ["rl", "--suite", "minatar5", "--method", "ewc", "--games", "1", "--steps",
            "300", "--envs", "2", "--n-steps", "64", "--eval-episodes", "1",
            "--eval-max-steps", "20", "--gif-frames", "0", "--out", str(out)]
    assert main(args) == 0
    assert "each game runs 256 env steps" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "ewc" and res["per_game"][0]["method"]["fisher_samples"] == 128
    assert (res["steps_per_game"], res["steps_requested"], res["updates_per_game"]) == (
        256, 300, 2)
    assert res["per_game"][0]["env_steps"] == 256
    assert res["kernel_backend"] == blip_kernels.current_backend("cpu")  # what the run used
    assert main(["rl", "--compare", str(out), str(out), "--out", str(tmp_path)]) == 0
    assert "ewc" in capsys.readouterr().out
    assert (tmp_path / "compare.md").is_file() and (tmp_path / "compare.png").is_file()
    # a run that has not finished (results.json is written after every game) is refused
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    res.update(complete=False, games_done=0)
    (partial / "results.json").write_text(json.dumps(res))
    assert main(["rl", "--compare", str(out), str(partial), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "not finished" in err and str(partial) in err
    assert main(["rl", "--envs", "0", "--out", str(tmp_path / "x")]) == 2
    assert "envs" in capsys.readouterr().err
    assert main(["rl", "--steps", "100", "--envs", "4", "--n-steps", "32",
                 "--out", str(tmp_path / "y")]) == 2
    assert "steps must be at least one rollout" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


# -- what a new user meets: threads, --smoke, eval progress, plurals ------------------------


def test_default_threads_one_on_minatar_half_the_cores_on_atari() -> None:
    from blip.rl.envs import default_threads
    from blip.runs.rundir import plural

    assert [default_threads("minatar5", c) for c in (1, 2, 64)] == [1, 1, 1]
    assert [default_threads("atari6", c) for c in (1, 2, 3, 6, 16, 64)] == [1, 1, 1, 3, 8, 8]
    with pytest.raises(ValueError, match="suite"):
        default_threads("nosuch", 2)
    assert (plural(1, "whole rollout"), plural(2, "game"), plural(0, "episode")) == (
        "1 whole rollout", "2 games", "0 episodes")


def test_unset_threads_use_the_default_not_every_core() -> None:
    _need("minatar5")
    torch.set_num_threads(2)  # torch's default on this 2-core machine
    runner = RLRunner(_cfg("minatar5"), "unused", quiet=True)
    assert runner.threads == 1 and torch.get_num_threads() == 1
    RLRunner(_cfg("minatar5", threads=2), "unused", quiet=True)
    assert torch.get_num_threads() == 2  # an explicit --threads wins


def test_smoke_runs_two_games_with_one_short_eval_episode(tmp_path, capsys) -> None:
    _need("minatar5")
    from blip.cli import main

    out = tmp_path / "smoke"
    assert main(["rl", "--smoke", "--no-plots", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    assert res["complete"] and res["games"] == ["Breakout", "SpaceInvaders"]
    assert (cfg["eval_episodes"], cfg["eval_max_steps"], cfg["envs"], res["updates_per_game"]
            ) == (1, 200, 4, 2)
    assert res["torch_threads"] == 1
    assert "(2 updates of 4x64)" in log and "1 thread" in log
    assert "evaluating 1 game x 1 episode" in log and "evaluating 2 games x 1 episode" in log
    assert "1 games" not in log and "1 episodes" not in log
    # options the user gives win over the smoke settings
    assert main(["rl", "--smoke", "--games", "1", "--eval-episodes", "2", "--no-plots",
                 "--gif-frames", "0", "--out", str(tmp_path / "s1")]) == 0
    res = json.loads((tmp_path / "s1" / "results.json").read_text())
    assert res["games"] == ["Breakout"] and res["config"]["eval_episodes"] == 2


def test_evaluation_shows_a_progress_bar(tmp_path, capsys) -> None:
    _need("minatar5")
    kw = {"games": 1, "steps": 256, "gif_frames": 0,
          "ppo": PPOConfig(n_steps=64, n_minibatches=2, epochs=1)}
    RLRunner(_cfg("minatar5", **kw), tmp_path, quiet=False, plots=False, progress=True).run()
    captured = capsys.readouterr()
    assert "eval after Breakout" in captured.err
    assert "evaluating 1 game x 2 episodes" in captured.out
