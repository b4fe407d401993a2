"""The unified view of gradient-based attribution (PAPER.md) as one table: every method is a row.

Each method approximates further training by a quadratic model with damping lambda:

    score_i(z) = eps * grad g(z)^T  K  grad L(z_i),     eps = 1/n  (n = number of training rows)

where K is the method's operator (identity, a damped inverse Gauss-Newton / Hessian, a truncated
Neumann series, a per-layer Sherman-Morrison approximation, ...). Sign convention: a positive score
means removing z_i *raises* the test function g (the paper's gold standard a_i). `tracin_final` carries
the learning rate as well (eps * lr); `grad_cos` normalises both gradients first.

A row names the operator used on each of the two paths, a class registered by that name
(tdastore/precond/registry.py):
- projected: in the store's (projected) space, fitted from the stored rows, K = Q diag(d) Q^T, so
  K^(1/2) transforms rows for a FAISS inner-product search (tdastore/precond/projected/);
- exact: in the model's full parameter space with Hessian / Gauss-Newton-vector products
  (tdastore/precond/exact/), as the paper ran it on 18k-120k-parameter MLPs.
Adding a method is adding a row (and, for a new operator, one registered class on a path). `metagrad` is the one
row with no quadratic model: it differentiates the gold standard's further training itself
(tdastore/groundtruth/metagrad.py), so it is computed per ground truth (`tdastore metagrad`) and shows up
in `tdastore evaluate`, not in single queries.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tdastore.errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    projected: str | None  # operator on the projected path (None: not available there)
    exact: str | None  # operator on the exact path (None: not available there)
    normalise: bool = False  # unit-normalise train and test gradients (cosine)
    normalise_metric: bool = False  # unit-normalise in the operator's metric, g / sqrt(g^T K g) (adam_cos)
    normalised_store: bool = False  # projected path: a store built with gradients.normalizer (adam_dot, adam_cos)
    learning_rate: bool = False  # multiply by the training learning rate (TracIn)
    further_training: bool = False  # scores a ground truth's further-training run, not a single query
    summary: str = ""
    unit_sides: tuple[str, ...] = ()  # attribution.normalize's additions: "train", "test" (see with_normalize)

    def unit(self, side: str) -> bool:
        """Unit-normalise this side's gradients ("train" or "test") before the operator: cosine methods, or
        attribution.normalize."""
        return self.normalise or side in self.unit_sides

    def unit_projected(self, side: str) -> bool:
        """Projected path: unit-normalise this side's rows (in a normalised store's space that is the operator's
        metric, so adam_cos is TrackStar's form there)."""
        return self.unit(side) or self.normalise_metric

    @property
    def index_name(self) -> str:
        """The name of this method's FAISS indexes: unit-normalised train rows are other rows."""
        return f"{self.name}-unit" if "train" in self.unit_sides and not self.normalise else self.name

    def operator(self, path: str) -> str:
        op = self.projected if path == "projected" else self.exact
        if op is None:
            other = "exact" if path == "projected" else "projected"
            raise ConfigError(
                f"method '{self.name}' has no {path} path ({self.summary}); set attribution.path: {other}"
            )
        return op


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("grad_dot", "identity", "identity", summary="first order: drop the Hessian"),
        Method("grad_cos", "identity", "identity", normalise=True, summary="Grad-Dot of unit-normalised gradients"),
        Method(
            "tracin_final",
            "identity",
            "identity",
            learning_rate=True,
            summary="TracIn at the last checkpoint: lr x Grad-Dot",
        ),
        Method(
            "if_gn", "fisher", "gauss_newton", summary="damped Gauss-Newton influence (projected: empirical Fisher)"
        ),
        Method("if_diag", "diagonal", "diagonal", summary="influence with a damped diagonal empirical Fisher"),
        Method(
            "adam_dot",
            "identity",
            "adam",
            normalised_store=True,
            summary="optimizer-aware: g^T diag(1/(sqrt(v)+eps)) g_i, v Adam's second moment at the final model",
        ),
        Method(
            "adam_cos",
            "identity",
            "adam",
            normalised_store=True,
            normalise_metric=True,
            summary="adam_dot of gradients unit-normalised in Adam's metric (TrackStar's form)",
        ),
        Method(
            "adam_replay",
            None,
            "adam_replay",
            summary="optimizer-aware: the further training's Adam steps replayed on frozen gradients without row i",
        ),
        Method(
            "if_h", None, "hessian", summary="damped true-Hessian influence; needs Hessian-vector products on the model"
        ),
        Method(
            "lissa",
            "lissa_fisher",
            "lissa_gauss_newton",
            summary="Neumann-series solve of the damped Gauss-Newton system",
        ),
        Method(
            "if_gen",
            None,
            "generalised",
            summary="Proposition 1: influence with the non-stationarity correction Hess L_i dTheta(D)",
        ),
        Method("trak1", "trak", None, summary="TRAK with one model: Gauss-Newton in the random projection, lambda ~ 0"),
        Method(
            "datainf", "datainf", "datainf", summary="per-layer Sherman-Morrison, lambda_l = mean squared gradient / 10"
        ),
        Method(
            "kfac", "kfac", None, summary="per-module Kronecker factors A (x) S in the factored space (factored stores)"
        ),
        Method(
            "ekfac",
            "ekfac",
            "ekfac",
            summary="Kronecker factors with eigenvalue correction (projected: factored stores)",
        ),
        Method(
            "metagrad",
            None,
            "metagrad",
            further_training=True,
            summary="-dg/dw_i through the further-training steps themselves (reverse or forward mode)",
        ),
    ]
}


NORMALIZE_SIDES = {"none": (), "train": ("train",), "test": ("test",), "both": ("train", "test")}


def with_normalize(method: Method, normalize: str) -> Method:
    """The method with attribution.normalize applied (none: the method as it is; grad_cos is already both)."""
    if normalize not in NORMALIZE_SIDES:
        raise ConfigError(f"attribution.normalize '{normalize}': use one of {list(NORMALIZE_SIDES)}")
    return replace(method, unit_sides=NORMALIZE_SIDES[normalize]) if NORMALIZE_SIDES[normalize] else method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}': choose one of {sorted(METHODS)}")
    return METHODS[name]
