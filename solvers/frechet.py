"""The Frechet distance between Gaussians fitted to two feature sets: FID on Inception features
(:mod:`training.rewards.fid`) and the benchmarks' FD on the samples themselves (:mod:`solvers.evaluate`).

``FD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))`` with unbiased covariances (``np.cov``, as pytorch-fid).
:func:`frechet_distance` is the standard computation (``scipy.linalg.sqrtm``, an eps-regularised retry when
the product is singular, tiny imaginary parts dropped). When one side has its features and fewer samples than
dimensions, :func:`feature_frechet_distance` uses the exact low-rank identity ``Tr sqrt(S1 S2) = sum_i
sqrt(l_i)`` with ``l_i`` the eigenvalues of the ``n x n`` matrix ``A S2 A^T / (n - 1)`` (``A`` the centred
features): the same value without a ``D x D`` square root.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

__all__ = ["statistics_from_features", "frechet_distance", "feature_frechet_distance", "sample_frechet_distance"]


def statistics_from_features(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], sigma [D, D])``: the mean and the unbiased covariance (``np.cov``), as pytorch-fid."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID statistics need at least 2 feature vectors [N, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """The standard Frechet distance of two Gaussians (pytorch-fid's ``calculate_frechet_distance``)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shapes do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: the product of the covariances is singular; adding {eps} to their diagonals",
                      RuntimeWarning, stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrt(S1 S2)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _trace_sqrt_low_rank(features: np.ndarray, sigma_other: np.ndarray) -> tuple[float, float, np.ndarray]:
    """``(Tr sqrt(S1 S2), Tr S1, mu1)`` with ``S1`` the covariance of ``features`` (exact for any ``n``)."""
    features = np.asarray(features, dtype=np.float64)
    n = features.shape[0]
    mu = features.mean(axis=0)
    centred = features - mu
    gram = centred @ sigma_other @ centred.T / (n - 1)
    eig = np.linalg.eigvalsh((gram + gram.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum()), float((centred * centred).sum() / (n - 1)), mu


def feature_frechet_distance(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray,
                      ref_features: np.ndarray | None = None, method: str = "auto") -> float:
    """The Frechet distance of ``features [N, D]`` to a reference Gaussian (FID on Inception features).

    ``method="auto"``: the exact low-rank form when a side with features has ``N < D`` (fast, no imaginary parts),
    else :func:`frechet_distance`; ``"sqrtm"``: always :func:`frechet_distance`.
    """
    if method not in ("auto", "sqrtm"):
        raise ValueError(f"method must be 'auto' or 'sqrtm', got {method!r}")
    features = np.asarray(features, dtype=np.float64)
    mu, sigma = statistics_from_features(features)
    mu_ref, sigma_ref = np.asarray(mu_ref, np.float64), np.asarray(sigma_ref, np.float64)
    if mu.shape != mu_ref.shape:
        raise ValueError(f"feature size {mu.shape[0]} does not match the reference's {mu_ref.shape[0]}")
    dim = mu.shape[0]
    if method == "auto":
        if features.shape[0] < dim:
            tr_sqrt, tr_own, _ = _trace_sqrt_low_rank(features, sigma_ref)
            diff = mu - mu_ref
            return float(diff.dot(diff) + tr_own + np.trace(sigma_ref) - 2 * tr_sqrt)
        if ref_features is not None and np.asarray(ref_features).shape[0] < dim:
            tr_sqrt, tr_ref, _ = _trace_sqrt_low_rank(ref_features, sigma)
            diff = mu - mu_ref
            return float(diff.dot(diff) + np.trace(sigma) + tr_ref - 2 * tr_sqrt)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


def sample_frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance between two sample sets (rows, flattened): Gaussians fitted to each."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    return feature_frechet_distance(a, *statistics_from_features(b), ref_features=b)
