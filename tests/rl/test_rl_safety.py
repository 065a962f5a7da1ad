"""`blip rl` is safe by default too (issue 11): a pickled env in a mid-game checkpoint never
runs, and RL settings are finite in float32."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch

import blip.runs.checkpoint as ckpt
from blip import cli


class Payload:
    """Unpickling this creates ``marker`` (a stand-in for ``os.system(...)``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_rl_checkpoint_env_payload_does_not_run(tmp_path: Path) -> None:
    pytest.importorskip("minatar")
    from blip.rl.ppo import PPOConfig
    from blip.rl.runner import RLConfig, RLRunner

    cfg = RLConfig(suite="minatar5", games=1, envs=2, steps=256, checkpoint_every=1,
                   gif_frames=0, eval_episodes=1, eval_max_steps=20,
                   ppo=PPOConfig(n_steps=32, n_minibatches=2, epochs=1))
    out, marker = tmp_path / "rl", tmp_path / "pwned"
    assert RLRunner(cfg, out, quiet=True, plots=False).run(stop_after_updates=1) == \
        {"stopped": True}
    c = ckpt.load(out / "checkpoint.pt")
    assert isinstance(c["mid"]["env"], dict)  # plain data, not a pickle
    c["mid"]["env"] = pickle.dumps(Payload(marker))  # bytes pass weights_only: refused later
    ckpt.save_atomic(c, out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint\.pt.*pickled env"):
        RLRunner(cfg, out, quiet=True, plots=False).run(resume=True)
    torch.save({"config": cfg.to_dict(), "state": Payload(marker)}, out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint\.pt.*--trust-pickles"):
        RLRunner(cfg, out, quiet=True, plots=False).run(resume=True)
    assert not marker.exists()


def test_rl_refuses_inf_lamb(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from blip.rl.runner import RLConfig, RLRunner

    for lamb in (math.inf, 1e39, True):
        with pytest.raises(ValueError, match="lamb must be a finite number"):
            RLRunner(RLConfig(method="ewc", lamb=lamb, steps=4096), tmp_path / "rl")
    rc = cli.main(["rl", "--method", "ewc", "--lamb", "inf", "--steps", "4096", "--quiet",
                   "--out", str(tmp_path / "rl")])
    assert rc == 2 and "lamb must be" in capsys.readouterr().err
