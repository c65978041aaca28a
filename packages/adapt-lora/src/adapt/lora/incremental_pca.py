"""Incremental PCA (Ross et al., 2008; the algorithm of scikit-learn's ``IncrementalPCA``) in
torch, with the numerics PEFT's EVA uses, so EVA's components match PEFT's.

Each :meth:`IncrementalPCA.partial_fit` folds a batch ``X`` (n × d) into the fit:

* the running mean and (population) variance of every feature are kept in float64 and merged
  with Chan et al.'s pairwise formula;
* the first batch is centred on the running mean and decomposed as it comes (float32 for a
  float32 batch); later batches are centred on their own mean and stacked under the previous
  fit as ``[diag(S)·Vᵀ ; X − x̄ ; mean correction]``, which promotes them to float64;
* the SVD is ``torch.svd_lowrank(X, q=2k, niter=4)`` run inside ``torch.random.fork_rng()``
  after ``torch.manual_seed(seed)`` on every call (the same random test matrix for the same
  shape, the global generator untouched), or ``torch.linalg.svd`` with ``lowrank=False``;
* each component is flipped so that its entry of largest magnitude is positive;
* ``explained_variance_ratio_ = S² / Σ(var · N)``: the share of the total centred sum of
  squares over every sample seen, comparable across layers.
"""

from __future__ import annotations

import torch

__all__ = ["IncrementalPCA"]


class IncrementalPCA:
    """The top ``n_components`` principal directions of every row fitted so far."""

    def __init__(
        self,
        n_components: int,
        *,
        lowrank: bool = True,
        lowrank_q: int | None = None,
        lowrank_niter: int = 4,
        lowrank_seed: int | None = 42,
    ) -> None:
        if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"n_components must be a whole number ≥ 1, got {n_components!r}")
        q = 2 * n_components if lowrank_q is None else lowrank_q
        if q < n_components:
            raise ValueError(f"lowrank_q={q} must be at least n_components={n_components}")
        self.n_components = n_components
        self.lowrank = lowrank
        self.lowrank_q = q
        self.lowrank_niter = lowrank_niter
        self.lowrank_seed = lowrank_seed
        self.n_features: int | None = None
        self.components_: torch.Tensor | None = None
        self.singular_values_: torch.Tensor | None = None
        self.mean_: torch.Tensor | None = None
        self.var_: torch.Tensor | None = None
        self.n_samples_seen_: torch.Tensor | None = None
        self.explained_variance_: torch.Tensor | None = None
        self.explained_variance_ratio_: torch.Tensor | None = None

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"partial_fit takes a 2-D batch (samples × features), got {x.shape}")
        n, d = x.shape
        if self.n_components > d:
            raise ValueError(
                f"n_components={self.n_components} is more than the {d} features of the data"
            )
        if self.n_components > n:
            raise ValueError(
                f"n_components={self.n_components} is more than the {n} samples of this batch"
            )
        if self.n_features is not None and d != self.n_features:
            raise ValueError(f"this batch has {d} features, the first one had {self.n_features}")
        x = x.clone()
        return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)

    def _mean_and_var(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Running mean, variance and count with ``x`` folded in (float64)."""
        seen = self.n_samples_seen_
        assert seen is not None
        count = torch.tensor([x.shape[0]], device=x.device)
        total = seen + count
        last_sum = (
            torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            if self.mean_ is None
            else self.mean_ * seen
        )
        new_sum = x.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / total
        centred = x - new_sum / count
        correction = centred.sum(dim=0, dtype=torch.float64).square()
        centred.square_()
        unnormalised = centred.sum(dim=0, dtype=torch.float64)
        unnormalised -= correction / count
        if self.var_ is None:
            return mean, unnormalised / total, total
        ratio = seen.double() / count
        merged = (
            self.var_ * seen + unnormalised + ratio / total * (last_sum / ratio - new_sum).square()
        )
        return mean, merged / total, total

    def _svd(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Singular values and right singular vectors (rows) of ``x``."""
        if not self.lowrank:
            _, s, vt = torch.linalg.svd(x, full_matrices=False)
            return s, vt
        seeded = self.lowrank_seed is not None
        with torch.random.fork_rng(enabled=seeded):
            if self.lowrank_seed is not None:
                torch.manual_seed(self.lowrank_seed)
            _, s, v = torch.svd_lowrank(x, q=self.lowrank_q, niter=self.lowrank_niter)
        return s, v.mH

    @torch.no_grad()
    def partial_fit(self, x: torch.Tensor) -> IncrementalPCA:
        """Fold the batch ``x`` (n × d, n ≥ n_components) into the fit."""
        x = self._checked(x)
        first = self.components_ is None
        if first:
            self.n_samples_seen_ = torch.tensor([0], device=x.device)
            self.n_features = x.shape[1]
        seen = self.n_samples_seen_
        assert seen is not None
        mean, var, total = self._mean_and_var(x)
        if first:
            x -= mean
        else:
            assert self.components_ is not None and self.singular_values_ is not None
            assert self.mean_ is not None
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            factor = torch.sqrt((seen.double() / total) * x.shape[0])
            x = torch.vstack(
                (
                    self.singular_values_.view((-1, 1)) * self.components_,
                    x,
                    factor * (self.mean_ - batch_mean),
                )
            )
        s, vt = self._svd(x)
        # sign: each component's entry of largest magnitude positive
        signs = torch.sign(vt[range(vt.shape[0]), torch.argmax(torch.abs(vt), dim=1)])
        vt *= signs.view(-1, 1)
        k = self.n_components
        self.n_samples_seen_ = total
        self.components_ = vt[:k]
        self.singular_values_ = s[:k]
        self.mean_ = mean
        self.var_ = var
        self.explained_variance_ = (s**2 / (total - 1))[:k]
        self.explained_variance_ratio_ = (s**2 / torch.sum(var * total))[:k]
        return self
