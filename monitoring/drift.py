"""Online drift detection: a calibrated novelty score per request and a CUSUM over it.

How it works, per adapter:

1. **Reference profile.** ``n`` feature vectors (the adapter's tuning data, or its first ``n`` requests) are
   split at random in two halves. The first half fixes a centring and a whitened projection on its top
   principal components; the second half, projected, is the neighbour set. A request's *novelty* is its mean
   distance to its ``k`` nearest neighbours.
2. **Calibration.** Each neighbour-set point's leave-one-out novelty (distance to the *other* points) gives
   ``n/2`` calibration values exchangeable with live novelties when nothing changed (split conformal
   calibration: the projection never saw either, which is why it is fitted on the other half); a live
   request's rank among them is a p-value-like ``u``, and ``z = Phi^-1(u)`` is approximately standard normal
   under no drift, whatever the features look like.
3. **Sequential test.** A one-sided CUSUM, ``S_t = max(0, S_{t-1} + z_t - k)``, alarms when ``S_t > h``.
   Because ``z`` is standardised, ``h`` follows from the configured expected run length (ERT: requests between
   false alarms when nothing changed) alone, by Siegmund's approximation for Gaussian CUSUM; no simulation on
   the user's data is needed. ``k`` trades speed on large shifts against speed on small ones: a CUSUM is
   fastest for a mean shift of ``2k`` in ``z``. After an alarm ``S`` restarts from 0.

State to save (:meth:`DriftDetector.state_dict`) is named explicitly: the profile arrays and the CUSUM scalars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

_NORMAL = NormalDist()


class DriftConfig(BaseModel):
    """Per-adapter drift detection settings; the defaults need no tuning."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ert: float = Field(default=10_000, gt=1, description="Expected requests between false alarms with no drift.")
    reference_size: int = Field(default=1000, ge=50, description="Requests (or tuning examples) in the reference.")
    allowance: float = Field(default=0.15, gt=0, description="CUSUM k: fastest on shifts of 2k standard units.")
    n_components: int = Field(default=64, gt=0, description="Principal components kept from the features.")
    n_neighbors: int = Field(default=5, gt=0)
    window: int = Field(default=200, gt=0, description="Recent requests summarised in alarm events.")
    enabled: bool = Field(default=True, description="Run drift detection for this adapter at all.")
    ert_over: Literal["references", "stream"] = Field(
        default="references",
        description="'references' (default): the ERT holds as measured, averaged over how the reference sample "
                    "happened to come out (a finite reference shifts each deployment's scores a little, and run "
                    "lengths grow exponentially with that shift); 'stream': the ERT holds for a deployment whose "
                    "reference calibrated without bias, and averaged over deployments the run length is longer "
                    "(2.6x measured at ERT 10,000; see cusum_threshold).")

    def threshold(self, n_calibration: int) -> float:
        """The CUSUM threshold for this ERT, given the reference's number of held-out calibration novelties
        (used only by ``ert_over='references'``)."""
        return cusum_threshold(self.allowance, self.ert, n_calibration if self.ert_over == "references" else None)


def cusum_arl(k: float, h: float, mu: float = 0.0) -> float:
    """Average run length of a CUSUM with allowance ``k`` and threshold ``h`` on N(mu, 1) increments.

    Siegmund's approximation: with ``d = mu - k`` and ``b = h + 1.166``,
    ``ARL = (exp(-2 d b) + 2 d b - 1) / (2 d^2)`` (``b^2`` when ``d = 0``).
    """
    d, b = mu - k, h + 1.166
    if abs(d) < 1e-9:
        return b * b
    x = -2 * d * b
    return (math.exp(min(x, 700.0)) - x - 1) / (2 * d * d)


@lru_cache(maxsize=256)
def cusum_threshold(k: float, ert: float, n_calibration: int | None = None) -> float:
    """The CUSUM threshold ``h`` whose in-control average run length is ``ert``.

    Without ``n_calibration``: for exactly N(0, 1) increments. With it: averaged over the draw of a
    reference whose ``n_calibration`` held-out novelties calibrate the scores. A finite calibration set shifts
    the in-control mean of the scores by a random ``b`` with standard deviation ~``1/sqrt(n)`` (measured by
    simulation of the rank transform), and because the run length grows exponentially as ``b`` goes negative,
    the run length averaged over reference draws is longer than for ``b = 0`` (Jensen); this solves
    ``E_b[ARL(h; b)] = ert`` with Gauss-Hermite quadrature. Individual deployments then see false alarms
    more often than ``1/ert`` when their reference came out biased high, and less often otherwise.
    """
    if n_calibration is None:
        def arl(h: float) -> float:
            return cusum_arl(k, h)
    else:
        nodes, weights = np.polynomial.hermite_e.hermegauss(60)
        weights = weights / weights.sum()
        sd = 1.0 / math.sqrt(n_calibration)

        def arl(h: float) -> float:
            return float(sum(w * cusum_arl(k, h, sd * x) for x, w in zip(nodes, weights)))

    lo, hi = 0.0, 1.0
    while arl(hi) < ert:
        hi *= 2
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if arl(mid) < ert else (lo, mid)
    return (lo + hi) / 2


@dataclass
class ReferenceProfile:
    """PCA-whitened reference points and their leave-one-out kNN novelties (sorted)."""

    mean: np.ndarray
    components: np.ndarray  # [d, c], whitening folded in
    points: np.ndarray  # [n, c]
    calibration: np.ndarray  # [n], sorted
    n_neighbors: int

    @classmethod
    def fit(cls, x: np.ndarray, *, n_components: int = 32, n_neighbors: int = 10, seed: int = 0) -> ReferenceProfile:
        x = np.asarray(x, dtype=np.float64)
        need = max(40, 2 * (n_neighbors + 2))
        if x.ndim != 2 or len(x) < need:
            raise ValueError(f"a reference needs a 2-D array of at least {need} feature vectors, got shape {x.shape}")
        order = np.random.default_rng(seed).permutation(len(x))
        proj_half, neigh_half = x[order[: len(x) // 2]], x[order[len(x) // 2 :]]
        mean = proj_half.mean(0)
        c = min(n_components, x.shape[1], len(proj_half) - 1)
        _, s, vt = np.linalg.svd(proj_half - mean, full_matrices=False)
        scale = s[:c] / math.sqrt(len(proj_half) - 1)
        components = vt[:c].T / np.maximum(scale, 1e-12)
        points = (neigh_half - mean) @ components
        k = min(n_neighbors, len(points) - 1)
        d = _sqdist(points, points)
        np.fill_diagonal(d, np.inf)
        loo = np.sqrt(np.partition(d, k - 1, axis=1)[:, :k]).mean(1)
        return cls(mean=mean, components=components, points=points, calibration=np.sort(loo), n_neighbors=k)

    def novelty(self, x: np.ndarray) -> np.ndarray:
        p = (np.asarray(x, dtype=np.float64) - self.mean) @ self.components
        d = _sqdist(p, self.points)
        k = self.n_neighbors
        return np.sqrt(np.partition(d, k - 1, axis=1)[:, :k]).mean(1)

    def z(self, x: np.ndarray) -> np.ndarray:
        """Standardised novelty: ``Phi^-1`` of the smoothed calibration rank; ~N(0, 1) with no drift."""
        s = self.novelty(x)
        n = len(self.calibration)
        below = np.searchsorted(self.calibration, s, side="left")
        ties = np.searchsorted(self.calibration, s, side="right") - below
        u = (below + 0.5 * ties + 0.5) / (n + 1)
        return np.array([_NORMAL.inv_cdf(float(v)) for v in u])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "components": self.components, "points": self.points,
                "calibration": self.calibration, "n_neighbors": np.array(self.n_neighbors)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> ReferenceProfile:
        return cls(mean=a["mean"], components=a["components"], points=a["points"], calibration=a["calibration"],
                   n_neighbors=int(a["n_neighbors"]))


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(d, 0.0)


@dataclass(frozen=True)
class Update:
    """Result of :meth:`DriftDetector.update`: rows ``[offset:]`` were live and got standardised novelty ``z``;
    ``alarms`` are row indices (into the input) where the CUSUM crossed its threshold."""

    offset: int
    z: np.ndarray
    alarms: list[int]


@dataclass
class DriftDetector:
    """Reference profile + CUSUM for one adapter.

    Until the profile exists, :meth:`update` collects reference features (the first ``reference_size``
    requests) unless a reference was given with :meth:`set_reference`.
    """

    config: DriftConfig = field(default_factory=DriftConfig)
    profile: ReferenceProfile | None = None
    statistic: float = 0.0
    seen: int = 0
    alarms: int = 0
    last_alarm_at: int | None = None
    pending: list[np.ndarray] = field(default_factory=list)

    @property
    def threshold(self) -> float:
        n = self.config.reference_size
        n_cal = len(self.profile.calibration) if self.profile is not None else n - n // 2  # the neighbour half
        return self.config.threshold(n_cal)

    @property
    def ready(self) -> bool:
        return self.profile is not None

    def set_reference(self, x: np.ndarray) -> None:
        """Fit the profile on ``x`` (e.g. the adapter's tuning data); restarts the CUSUM."""
        self.profile = ReferenceProfile.fit(x, n_components=self.config.n_components,
                                            n_neighbors=self.config.n_neighbors)
        self.statistic, self.pending = 0.0, []

    def score(self, x: np.ndarray) -> np.ndarray:
        """Pure: the standardised novelty of each row of ``x`` (requires a profile)."""
        if self.profile is None:
            raise RuntimeError("no reference profile yet; call set_reference() or feed reference requests first")
        return self.profile.z(x)

    def update(self, x: np.ndarray) -> Update:
        """Feed feature rows in arrival order (reference rows first while the reference is being collected)."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        offset = 0
        if self.profile is None:
            need = self.config.reference_size - sum(len(p) for p in self.pending)
            self.pending.append(x[:need])
            if need > len(x):
                return Update(offset=len(x), z=np.empty(0), alarms=[])
            self.set_reference(np.concatenate(self.pending))
            x, offset = x[need:], need
            if not len(x):
                return Update(offset=offset, z=np.empty(0), alarms=[])
        z = self.score(x)
        h, k = self.threshold, self.config.allowance
        fired = []
        s = self.statistic
        for i, zi in enumerate(z):
            s = max(0.0, s + float(zi) - k)
            self.seen += 1
            if s > h:
                fired.append(offset + i)
                self.alarms += 1
                self.last_alarm_at = self.seen
                s = 0.0
        self.statistic = s
        return Update(offset=offset, z=z, alarms=fired)

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able scalars, named arrays): everything needed to resume after a restart."""
        scalars = {"config": self.config.model_dump(), "statistic": self.statistic, "seen": self.seen,
                   "alarms": self.alarms, "last_alarm_at": self.last_alarm_at}
        arrays = dict(self.profile.arrays()) if self.profile is not None else {}
        if self.pending:
            arrays["pending"] = np.concatenate(self.pending)
        return scalars, arrays

    @classmethod
    def from_state(cls, scalars: dict[str, Any], arrays: dict[str, np.ndarray]) -> DriftDetector:
        det = cls(config=DriftConfig(**scalars["config"]), statistic=float(scalars["statistic"]),
                  seen=int(scalars["seen"]), alarms=int(scalars["alarms"]), last_alarm_at=scalars["last_alarm_at"])
        if "points" in arrays:
            det.profile = ReferenceProfile.from_arrays(arrays)
        if "pending" in arrays:
            det.pending = [arrays["pending"]]
        return det
