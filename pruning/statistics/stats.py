"""Calibration statistics of one Linear's inputs, accumulated over calibration samples in fp32."""
from dataclasses import dataclass

import torch


@dataclass
class LinearStats:
    """What the pruning methods know about the inputs ``X`` of one Linear.

    act_sq_norm: [in] fp32, Wanda's statistic: the mean over calibration samples of
        ``||X_j||^2``, the squared norm of input column j over the sample's tokens.
    hessian: [in, in] fp32, SparseGPT's ``H = (2 / N) * sum over samples of X^T X`` (X of a sample
        is [tokens, in]), or None when no method needs it.
    nsamples: how many samples went in.
    tokens: how many input rows (tokens) went in: for an expert of a mixture-of-experts layer,
        the calibration tokens the router sent to it.
    out_sensitivity: [out] fp32 or None: how much each output feature matters to the model's
        loss, the mean over calibration tokens of ``(dL/dy_i)^2`` in the unpruned model
        (:func:`pruning.planning.sensitivity.unpruned_stats`). When present, the methods weight each
        output row's scores by it, so losses of different rows, matrices and layers compare.
    """

    act_sq_norm: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    nsamples: int = 0
    out_sensitivity: torch.Tensor | None = None
    tokens: int = 0

    @classmethod
    def empty(cls, in_features: int, *, hessian: bool, device=None) -> "LinearStats":
        return cls(torch.zeros(in_features, dtype=torch.float32, device=device),
                   torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
                   if hessian else None, 0)

    def add_batch(self, x: torch.Tensor, samples: int | None = None) -> None:
        """Fold in the inputs of one forward call over ``samples`` calibration samples.

        x: ``[samples, tokens, in]``, or ``[rows, in]``: the samples' tokens flattened (OPT's
        MLP), or only some of them (an expert's routed tokens); a 2-D input without ``samples``
        counts as one sample. The statistics are sums over the rows, averaged over samples, so a
        Linear that sees fewer tokens has proportionally smaller statistics (its share of the
        loss) while every row weighs the same.
        """
        x = x.detach().float()
        if samples is None:
            samples = x.shape[0] if x.dim() == 3 else 1
        flat = x.reshape(-1, x.shape[-1])
        total = self.nsamples + samples
        # Running means, as Wanda and SparseGPT keep them, so no sum grows without bound.
        self.act_sq_norm.mul_(self.nsamples / total).add_(flat.pow(2).sum(dim=0) / total)
        if self.hessian is not None:
            self.hessian.mul_(self.nsamples / total).addmm_(flat.t(), flat, alpha=2.0 / total)
        self.nsamples = total
        self.tokens += flat.shape[0]
