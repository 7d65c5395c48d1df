"""Inversion and editing: a real image's place in a model's noise space, and sampling from it under another condition.

``hasten.invert(model, images, method=..., steps=...)`` returns an :class:`Inversion`: the grid, the sampler's
state at every level of it and, for the stochastic methods, the noise of every step. Replaying it under the
source condition gives the image back; ``hasten.edit(model, inversion, to_label=...)`` replays it under another
class label (or, with a pipeline model conditioned on another prompt, another prompt), so the edit keeps what
the noise carries of the source. Three encoders (:data:`ENCODERS`):

* ``ddpm-inversion`` (edit-friendly DDPM inversion): every level's state drawn independently from
  ``q(x_t | x0)``; the step noise is whatever makes the ancestral sampler land on the next one. Exact.
* ``cyclediffusion`` (the DPM-Encoder): the states are one chain drawn from the sampler's own posterior
  ``q(x_{t-1} | x_t, x0)``, so the recovered noise is distributed like the sampler's. Exact.
* ``ddim-inversion``: the deterministic DDIM ODE run upwards. Not exact; its error falls with the steps.

The stochastic encoders' sampler is the ancestral (DDIM-eta) step of :class:`hasten.solvers.EulerAncestral`, run
by :func:`hasten.sample` with the recorded noise (``step_noise``); the step onto sigma = 0 adds no noise, so its
correction (the image minus the model's estimate at the last level) is recorded as well and added back: with it
the replay ends on the image up to float rounding, at any number of steps.
"""

from __future__ import annotations

from .encoders import ENCODERS, Inversion, edit, invert

__all__ = ["ENCODERS", "Inversion", "edit", "invert"]
