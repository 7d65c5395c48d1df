"""DPM-Solver-v3: a multistep exponential integrator in a model-specific parameterisation (EMS).

In VE form (``alpha = 1``, ``lambda = -log sigma``) the probability-flow ODE is ``dx/dlambda = -sigma eps``.
DPM-Solver-v3 splits ``sigma eps = l x + f`` with a per-dimension coefficient ``l_lambda`` chosen so that
``f = sigma eps - l x`` depends as little as possible on ``x`` (``l* = E[sigma diag(d eps / dx)]``), and
models ``f``'s change along the trajectory as ``df/dlambda ~ s f + b`` (``s*``, ``b*`` by least squares).
With ``L = int l``, ``S = int s``, ``B = int e^{-S} b`` the ODE solution from ``lambda_s`` to ``lambda_t`` is

    x_t = e^{L_s - L_t} x_s - e^{-L_t} int e^{L + S} (g + B) dlambda,   g = e^{-S} f - B,

and ``g`` is what gets Taylor-expanded (it is constant when ``df/dlambda = s f + b`` holds exactly). With
``g_hat_i = e^{S_s - S_i} f_i - e^{S_s} (B_i - B_s)`` (so ``g_hat_s = f_s``):

    x_t = e^{L_s-L_t} x_s - e^{-L_t-S_s} (I_t - I_s) g_hat_s - e^{-L_t} int_s^t e^{L+S} (B - B_s)
          - sum_k e^{L_s-L_t} [int_s^t e^{(L+S) - (L+S)_s} (lambda - lambda_s)^k / k!] g_hat^(k)

where ``I = int e^{L + S}`` and the derivatives ``g_hat^(k)`` come from the previous points (predictor of
order p from p - 1 past points) and, for the corrector, also from the new point (order p + 1, reusing the
evaluation the next step needs; ``f`` at the corrected point is kept, as in the paper). With ``l = 1``,
``s = b = 0`` ("degenerate" statistics) ``f = -x0_hat`` and the method is a data-prediction Taylor
multistep method (DPM-Solver++-like). The EMS are piecewise linear in lambda on their grid; integrals over
a step use Gauss-Legendre quadrature (16 nodes, nested for ``B``), so any requested grid is honoured
exactly (the official code snaps time steps to the EMS grid).

Reference: Zheng, Lu, Chen, Zhu, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model
Statistics", NeurIPS 2023, Sec. 3-4, Eq. (9)-(14), App. C (EMS estimation).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._io import atomic_path
from ..config import check_choice
from ._base import Model, NoiseFn, Solver, StepInfo, register_solver
from .multistep import multistep_order

__all__ = ["EMS", "DPMSolverV3", "V3State", "load_ems", "save_ems"]

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(16)


@dataclasses.dataclass(frozen=True)
class EMS:
    """Empirical model statistics ``l``, ``s``, ``b`` on an ascending lambda grid, shape ``[M, *sample_shape]``.

    Use :meth:`degenerate` for the statistics-free variant, :func:`hasten.solvers.dpm_solver_v3.load_ems` for
    saved ones, or :func:`hasten.tune.ems.estimate_ems` to measure them for a model.
    """

    lambdas: Tensor  # [M] ascending, float64
    l: Tensor
    s: Tensor
    b: Tensor
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        lam = self.lambdas.double()
        if lam.ndim != 1 or len(lam) < 2 or not bool((lam[1:] > lam[:-1]).all()):
            raise ValueError("EMS lambdas must be a strictly ascending 1-D grid of at least 2 points")
        for name in ("l", "s", "b"):
            value = getattr(self, name).double()
            if value.shape[0] != len(lam):
                raise ValueError(f"EMS {name} has {value.shape[0]} grid points, lambdas has {len(lam)}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"EMS {name} contains NaN or infinity")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "lambdas", lam)
        # L and S at the grid nodes: exact integrals of the piecewise-linear l and s.
        d = (lam[1:] - lam[:-1]).view(-1, *([1] * (self.l.ndim - 1)))
        zero = torch.zeros_like(self.l[:1])
        object.__setattr__(self, "_L", torch.cat([zero, torch.cumsum(0.5 * d * (self.l[1:] + self.l[:-1]), 0)]))
        object.__setattr__(self, "_S", torch.cat([zero, torch.cumsum(0.5 * d * (self.s[1:] + self.s[:-1]), 0)]))
        object.__setattr__(self, "_steps", {})

    @classmethod
    def degenerate(cls, lambda_min: float = -30.0, lambda_max: float = 30.0) -> EMS:
        """``l = 1``, ``s = b = 0`` everywhere: v3 without statistics (a data-prediction Taylor method)."""
        lam = torch.tensor([lambda_min, lambda_max], dtype=torch.float64)
        return cls(lam, torch.ones(2), torch.zeros(2), torch.zeros(2), {"kind": "degenerate"})

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.l.shape[1:])

    def _cell(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        lo, hi = float(self.lambdas[0]), float(self.lambdas[-1])
        slack = 1e-6 * (1.0 + hi - lo)  # rounding of sigma <-> lambda at the grid's ends
        if float(lam.min()) < lo - slack or float(lam.max()) > hi + slack:
            raise ValueError(
                f"lambda {float(lam.min()):.4g}..{float(lam.max()):.4g} (sigma {math.exp(-float(lam.max())):.4g}.."
                f"{math.exp(-float(lam.min())):.4g}) lies outside the EMS grid lambda in [{lo:.4g}, {hi:.4g}]; "
                "estimate the statistics over the whole range of the sampling grid"
            )
        j = torch.searchsorted(self.lambdas, lam.clamp(lo, hi), right=True).sub(1).clamp(0, len(self.lambdas) - 2)
        return j, lam.clamp(lo, hi) - self.lambdas[j]

    def _linear(self, values: Tensor, j: Tensor, d: Tensor) -> Tensor:
        width = (self.lambdas[j + 1] - self.lambdas[j]).view(-1, *([1] * (values.ndim - 1)))
        d = d.view(-1, *([1] * (values.ndim - 1)))
        return values[j] + (values[j + 1] - values[j]) * d / width

    def _integral(self, cumulative: Tensor, values: Tensor, j: Tensor, d: Tensor) -> Tensor:
        width = (self.lambdas[j + 1] - self.lambdas[j]).view(-1, *([1] * (values.ndim - 1)))
        d = d.view(-1, *([1] * (values.ndim - 1)))
        return cumulative[j] + values[j] * d + (values[j + 1] - values[j]) * d * d / (2 * width)

    def evaluate(self, lam: Tensor) -> dict[str, Tensor]:
        """``l``, ``s``, ``b``, ``L``, ``S`` at the lambdas ``lam`` (shape ``[K]``), each ``[K, *sample_shape]``."""
        j, d = self._cell(lam.double())
        return {
            "l": self._linear(self.l, j, d),
            "s": self._linear(self.s, j, d),
            "b": self._linear(self.b, j, d),
            "L": self._integral(self._L, self.l, j, d),
            "S": self._integral(self._S, self.s, j, d),
        }

    def step_coefficients(self, lam_s: float, lam_t: float, max_k: int) -> dict[str, Any]:
        """The per-dimension integrals of one step (cached per ``(lambda_s, lambda_t)``)."""
        key = (lam_s, lam_t, max_k)
        if key in self._steps:  # type: ignore[attr-defined]
            return self._steps[key]  # type: ignore[attr-defined]
        h = lam_t - lam_s
        # Outer nodes u_q on [s, t]; inner nodes v_qr on [s, u_q] for B(u_q) - B_s.
        u = lam_s + 0.5 * h * (torch.from_numpy(_NODES) + 1)
        w = 0.5 * h * torch.from_numpy(_WEIGHTS)
        ends = self.evaluate(torch.tensor([lam_s, lam_t], dtype=torch.float64))
        at_u = self.evaluate(u)
        inner = (lam_s + (u - lam_s).view(-1, 1) * 0.5 * (torch.from_numpy(_NODES).view(1, -1) + 1)).reshape(-1)
        inner_w = ((u - lam_s).view(-1, 1) * 0.5 * torch.from_numpy(_WEIGHTS).view(1, -1)).reshape(-1)
        at_v = self.evaluate(inner)
        shape = (-1, *([1] * len(self.sample_shape)))
        # e^{S_s} (B(u) - B_s) = int_s^u e^{S_s - S} b: only differences of S are exponentiated.
        integrand_b = torch.exp(ends["S"][:1] - at_v["S"]) * at_v["b"] * inner_w.view(shape)
        b_rel = integrand_b.view(len(u), len(_NODES), *self.sample_shape).sum(1)
        ls_s = ends["L"][0] + ends["S"][0]
        e_rel = torch.exp(at_u["L"] + at_u["S"] - ls_s) * w.view(shape)  # e^{(L+S) - (L+S)_s} dlambda
        L_s, L_t, S_s, S_t = ends["L"][0], ends["L"][1], ends["S"][0], ends["S"][1]
        out = {
            "L_s": L_s,
            "S_s": S_s,
            "S_t": S_t,
            "decay": torch.exp(L_s - L_t),  # e^{L_s - L_t}
            "I": torch.exp(L_s - L_t) * e_rel.sum(0),  # e^{-L_t - S_s} (I_t - I_s)
            "C": torch.exp(L_s - L_t) * (e_rel * b_rel).sum(0),  # e^{-L_t} int e^{L+S} (B - B_s)
            "moments": [
                torch.exp(L_s - L_t) * (e_rel * ((u - lam_s) ** k / math.factorial(k)).view(shape)).sum(0)
                for k in range(1, max_k + 1)
            ],
        }
        self._steps[key] = out  # type: ignore[attr-defined]
        return out

    def g_hat(self, f_i: Tensor, lam_i: float, lam_s: float) -> Tensor:
        """``e^{S_s - S_i} f_i - e^{S_s} (B_i - B_s)`` (with ``B = int e^{-S} b``, by quadrature)."""
        if lam_i == lam_s:
            return f_i
        ends = self.evaluate(torch.tensor([lam_s, lam_i], dtype=torch.float64))
        h = lam_i - lam_s
        v = lam_s + 0.5 * h * (torch.from_numpy(_NODES) + 1)
        at_v = self.evaluate(v)
        shape = (-1, *([1] * len(self.sample_shape)))
        b_rel = (
            torch.exp(ends["S"][0] - at_v["S"]) * at_v["b"] * (0.5 * h * torch.from_numpy(_WEIGHTS)).view(shape)
        ).sum(0)
        return f_i * torch.exp(ends["S"][0] - ends["S"][1]).to(f_i) - b_rel.to(f_i)


@functools.lru_cache(maxsize=8)
def _load_ems_cached(path: str, mtime: float) -> EMS:
    from safetensors import safe_open

    with safe_open(path, "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = dict(fh.metadata() or {})
    missing = {"lambdas", "l", "s", "b"} - set(tensors)
    if missing:
        raise ValueError(f"{path} is not an EMS file (missing {sorted(missing)})")
    return EMS(tensors["lambdas"], tensors["l"], tensors["s"], tensors["b"], meta)


def load_ems(path: str | os.PathLike) -> EMS:
    """Load statistics saved by :func:`save_ems` (safetensors; cached in memory per file version)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no EMS file at {path}")
    return _load_ems_cached(str(path.resolve()), path.stat().st_mtime)


def save_ems(ems: EMS, path: str | os.PathLike) -> pathlib.Path:
    """Write statistics atomically as safetensors (metadata values are stored as strings)."""
    from safetensors.torch import save_file

    tensors = {"lambdas": ems.lambdas, "l": ems.l, "s": ems.s, "b": ems.b}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), {k: str(v) for k, v in ems.meta.items()})
    return pathlib.Path(path)


@dataclasses.dataclass(frozen=True)
class V3State:
    """History, newest first: ``f`` values and their lambdas; the pre-predictor sample and its order."""

    fs: tuple[Tensor, ...] = ()
    lambdas: tuple[float, ...] = ()
    x_prev: Tensor | None = None
    prev_order: int = 0


@register_solver("dpm_solver_v3")
@dataclasses.dataclass(frozen=True)
class DPMSolverV3(Solver):
    """DPM-Solver-v3, multistep predictor of order p with the optional corrector (order p + 1).

    Args:
        ems: ``"degenerate"`` (no statistics: ``l = 1, s = b = 0``), a path to statistics saved by
            :func:`save_ems`, or ``"auto"``: :func:`hasten.generate` estimates them for the model (once,
            cached on disk by weights fingerprint and guidance scale).
        order: Predictor order p in {1, 2, 3} (the official default is 3 unconditional, 2 guided).
        corrector: Apply the corrector after every step except the last.
        lower_order_final: Lower the order in the final steps of short runs (below 15 steps).

    Reference: Zheng et al., DPM-Solver-v3, NeurIPS 2023, Alg. 1 and Eq. (14).
    """

    ems: str = "auto"
    order: int = 2
    corrector: bool = True
    lower_order_final: bool = True

    def __post_init__(self) -> None:
        check_choice("order", self.order, (1, 2, 3))

    @property
    def convergence_order(self) -> int:
        return self.order + (1 if self.corrector else 0)

    def statistics(self) -> EMS:
        if self.ems == "degenerate":
            return _DEGENERATE
        if self.ems == "auto":
            raise ValueError(
                "dpm_solver_v3 with ems='auto' needs the model's statistics: use hasten.generate / hasten sample "
                "(they estimate and cache them), or pass ems='degenerate' or the path of a saved EMS file"
            )
        return load_ems(self.ems)

    def step(self, model: Model, x: Tensor, info: StepInfo, state: Any, noise: NoiseFn) -> tuple[Tensor, Any]:
        ems = self.statistics()
        state = state or V3State()
        sigma = info.sigma
        lam = -math.log(sigma)
        l_s = ems.evaluate(torch.tensor([lam], dtype=torch.float64))["l"][0].to(x)
        denoised = model(x, sigma)
        f = torch.sub(x, denoised).sub_(x * l_s)  # sigma eps - l x, with sigma eps = x - D in VE form
        if self.corrector and state.x_prev is not None:
            # Corrector: redo the previous step with the new point; f at the corrected point is kept.
            x = self._update(ems, state.x_prev, state.lambdas, state.fs, lam, state.prev_order, f)
        if info.sigma_next == 0:  # lambda = inf: land on the denoised estimate (f = x - D - l x fixed)
            return torch.sub(x, x * l_s).sub_(f), V3State()
        k = multistep_order(self.order, len(state.fs), info, self.lower_order_final, 15)
        lams, fs = (lam, *state.lambdas), (f, *state.fs)
        x_next = self._update(ems, x, lams, fs, -math.log(info.sigma_next), k, None)
        return x_next, V3State(fs[:3], lams[:3], x, k)

    @staticmethod
    def _update(
        ems: EMS, x: Tensor, lams: tuple[float, ...], fs: tuple[Tensor, ...], lam_t: float, k: int, f_t: Tensor | None
    ) -> Tensor:
        """Predictor of order ``k`` from ``lams[0]`` (``f_t is None``) or corrector of order ``k + 1``."""
        lam_s = lams[0]
        points = [(lams[i], fs[i]) for i in range(1, k)]
        if f_t is not None:
            points.append((lam_t, f_t))
        n_der = len(points)
        coeff = ems.step_coefficients(lam_s, lam_t, max(n_der, 1))
        g_s = fs[0]
        out = x * coeff["decay"].to(x) - g_s * coeff["I"].to(x) - coeff["C"].to(x)
        if n_der:
            # Taylor derivatives of g_hat at lambda_s from the other points: sum_k g^(k) r^k / k! = g_i - g_s.
            r = [lam_i - lam_s for lam_i, _ in points]
            vander = np.array([[ri**j / math.factorial(j) for j in range(1, n_der + 1)] for ri in r])
            weights = np.linalg.inv(vander)  # g^(j) = sum_i W[j, i] (g_i - g_s)
            diffs = [ems.g_hat(f_i, lam_i, lam_s) - g_s for lam_i, f_i in points]
            for j in range(n_der):
                derivative = sum(float(weights[j, i]) * diffs[i] for i in range(n_der))
                out = out - derivative * coeff["moments"][j].to(x)
        return out


_DEGENERATE = EMS.degenerate()
