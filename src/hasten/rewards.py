"""Rewards on images for reward-guided sampling: a registry of bundled ones, any Python callable, checked calls.

A reward maps images in [0, 1], ``[N, C, H, W]``, to ``[N]`` numbers (higher is better). Bundled (``REWARDS``; a
spec is ``name`` or ``name:argument``):

* ``class:<digit>``: log-probability of that digit under hasten's bundled MNIST classifier
  (:func:`hasten.metrics.features.load_feature_net`); differentiable.
* ``ink``: the ink area, the fraction of pixels above 0.5 (a step function: no useful gradient, which is what
  derivative-free guidance is for).
* ``symmetry``: left-right mirror symmetry, ``-mean |x - flip(x)|`` (0 is a perfect mirror image); differentiable.

Every call is checked (:func:`hasten.solvers.svdd.check_values`): a reward that returns NaN, infinity or another
shape is refused with an error naming it. :func:`model_value` turns a reward into the value function SVDD needs
(the reward of a model-space x0 estimate's image); :func:`reward_solver` builds the SVDD solver
:func:`hasten.generate` runs.

Mind the oracle: steering by the classifier that also measures quality (``class:<d>``, and FD in its features)
can improve the numbers without improving the images; judge a classifier-steered run by a held-out oracle too
(``benchmarks/reward/measure.py`` trains one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .registry import Registry
from .solvers import SOLVERS, EulerAncestral, get_solver
from .solvers.svdd import SoftValueDecoding, check_values

__all__ = [
    "REWARDS",
    "REWARD_SOLVER",
    "Reward",
    "class_log_probability",
    "get_reward",
    "ink_area",
    "model_value",
    "register_reward",
    "reward_solver",
    "symmetry",
]

REWARD_SOLVER = "ddpm"  # what reward-guided sampling runs when no solver is named: an ancestral step

# name -> factory(argument or None) -> callable(images01) -> [N]
REWARDS: Registry[Callable[[str | None], Callable[[Tensor], Tensor]]] = Registry("reward")


def register_reward(name: str) -> Callable:
    """Decorator: register a reward factory ``factory(argument: str | None) -> reward`` under ``name``."""
    if ":" in name:
        raise ValueError(f"a reward name cannot contain ':' (it separates the argument), got {name!r}")
    return REWARDS.register(name)


class Reward:
    """A named reward on images in [0, 1]; every call is checked for shape and finiteness."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str) -> None:
        self.fn, self.name = fn, name

    def __call__(self, images01: Tensor) -> Tensor:
        return check_values(self.fn(images01), images01.shape[0], f"reward {self.name!r}")

    def __repr__(self) -> str:
        return f"reward {self.name!r}"


def get_reward(spec: str | Callable[[Tensor], Tensor] | Reward) -> Reward:
    """A :class:`Reward` from a registered spec (``"class:3"``, ``"ink"``) or any callable ``images01 -> [N]``.

    Raises:
        KeyError: unknown reward name (the message lists the registered ones).
        ValueError: a bad argument (the factory names it).
    """
    if isinstance(spec, Reward):
        return spec
    if callable(spec):
        return Reward(spec, getattr(spec, "__qualname__", None) or repr(spec))
    if not isinstance(spec, str):
        raise TypeError(f"reward must be a registered name or a callable, got {type(spec).__name__}")
    name, sep, argument = spec.partition(":")
    return Reward(REWARDS.get(name)(argument if sep else None), spec)


def _no_argument(name: str, argument: str | None) -> None:
    if argument is not None:
        raise ValueError(f"reward {name!r} takes no argument, got {name}:{argument}")


def _check_mnist(images01: Tensor, name: str) -> None:
    if images01.ndim != 4 or tuple(images01.shape[1:]) != (1, 28, 28):
        raise ValueError(f"reward {name!r} scores MNIST images [N, 1, 28, 28], got shape {tuple(images01.shape)}")


def class_log_probability(images01: Tensor, digit: int) -> Tensor:
    """``log p(digit | image)`` under hasten's bundled MNIST classifier (differentiable in the images)."""
    from .metrics.features import load_feature_net

    _check_mnist(images01, f"class:{digit}")
    net = load_feature_net("mnist")
    net = net.to(images01.device)
    _, logits = net(images01.to(next(net.parameters()).dtype))
    return torch.log_softmax(logits.float(), dim=1)[:, digit]


def ink_area(images01: Tensor) -> Tensor:
    """The fraction of pixels above 0.5."""
    return (images01 > 0.5).flatten(1).float().mean(1)


def symmetry(images01: Tensor) -> Tensor:
    """``-mean |x - flip_lr(x)|`` per image: 0 for a mirror-symmetric image, down to -1."""
    return -(images01 - images01.flip(-1)).abs().flatten(1).float().mean(1)


@register_reward("class")
def _class_reward(argument: str | None) -> Callable[[Tensor], Tensor]:
    if argument is None or not argument.isdigit() or not 0 <= int(argument) <= 9:
        raise ValueError(f"reward 'class' needs a digit 0-9, as class:3; got class:{argument or ''}")
    digit = int(argument)
    return lambda images01: class_log_probability(images01, digit)


@register_reward("ink")
def _ink_reward(argument: str | None) -> Callable[[Tensor], Tensor]:
    _no_argument("ink", argument)
    return ink_area


@register_reward("symmetry")
def _symmetry_reward(argument: str | None) -> Callable[[Tensor], Tensor]:
    _no_argument("symmetry", argument)
    return symmetry


def model_value(model: Any, reward: Reward) -> Callable[[Tensor], Tensor]:
    """The value of model-space x0 estimates: the reward of their images (``model.to_images``)."""

    def value(x0: Tensor) -> Tensor:
        return reward(model.to_images(x0))

    value.__qualname__ = f"value of {reward!r}"
    return value


def reward_solver(
    model: Any, reward: Reward, particles: int, alpha: float, solver: str, options: Mapping[str, Any]
) -> SoftValueDecoding:
    """The SVDD solver of a run: ``particles`` candidates of ``solver``'s ancestral step, valued by ``reward``.

    Raises:
        ValueError: ``particles < 1``, ``alpha < 0``, or a solver with no stochastic ancestral step to draw from.
    """
    if isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:
        raise ValueError(f"particles must be an integer >= 1, got {particles!r}")
    if not (isinstance(alpha, int | float) and alpha >= 0) or (isinstance(alpha, float) and math.isnan(alpha)):
        raise ValueError(f"alpha must be a number >= 0 (0: keep the best candidate), got {alpha!r}")
    transition = get_solver(solver, **options)
    if not isinstance(transition, EulerAncestral) or (particles > 1 and not transition.stochastic):
        ancestral = [n for n in SOLVERS.names() if SOLVERS.get(n).cls is EulerAncestral]
        raise ValueError(
            f"reward guidance with particles={particles} draws candidate next states from a stochastic ancestral "
            f"step; solver {solver!r}{f' (eta={transition.eta:g})' if isinstance(transition, EulerAncestral) else ''} "
            f"has none. Use one of "
            f"{', '.join(ancestral)} with eta > 0 "
            f"(the default for a reward is {REWARD_SOLVER})"
        )
    return SoftValueDecoding(transition, particles, float(alpha), model_value(model, reward))
