"""Continual reinforcement learning with BLIP: PPO on a sequence of Atari (ale-py)
or MinAtar games, one shared quantized conv trunk and one actor/critic head per game.

``blip rl --suite minatar5 --method blip`` (see :mod:`blip.rl.runner` for the run
directory). Modules: :mod:`~blip.rl.envs` (suites, vectorised envs),
:mod:`~blip.rl.agent` (network), :mod:`~blip.rl.ppo` (PPO), :mod:`~blip.rl.methods`
(blip, ewc, finetune, freeze), :mod:`~blip.rl.evaluate` (reward matrix),
:mod:`~blip.rl.gifs`, :mod:`~blip.rl.plots`, :mod:`~blip.rl.runner`.
Importing this package does not import gymnasium/ale-py/MinAtar (done when an env
is made).
"""

from .envs import SUITES
from .methods import METHODS
from .ppo import PPOConfig
from .runner import RLConfig, RLRunner, run_rl

__all__ = ["METHODS", "SUITES", "PPOConfig", "RLConfig", "RLRunner", "run_rl"]
