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
    out_sensitivity: [out] fp32 or None: how much each output feature matters to the model's
        loss, the mean over calibration tokens of ``(dL/dy_i)^2`` in the unpruned model
        (:func:`pruning.sensitivity.gradient_stats`). When present, the methods weight each
        output row's scores by it, so losses of different rows, matrices and layers compare.
    """

    act_sq_norm: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    nsamples: int = 0
    out_sensitivity: torch.Tensor | None = None

    @classmethod
    def empty(cls, in_features: int, *, hessian: bool, device=None) -> "LinearStats":
        return cls(torch.zeros(in_features, dtype=torch.float32, device=device),
                   torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
                   if hessian else None, 0)

    def add_batch(self, x: torch.Tensor, samples: int | None = None) -> None:
        """Fold in the inputs of one forward call over ``samples`` calibration samples.

        x: ``[samples, tokens, in]``, or ``[samples * tokens, in]`` as some models (OPT's MLP)
        flatten it; a 2-D input without ``samples`` counts as one sample.
        """
        x = x.detach().float()
        if x.dim() == 2:
            x = x.reshape(samples or 1, -1, x.shape[-1])
        x = x.reshape(-1, x.shape[-2], x.shape[-1])
        batch = x.shape[0]
        total = self.nsamples + batch
        # Running means, as Wanda and SparseGPT keep them, so no sum grows without bound.
        self.act_sq_norm.mul_(self.nsamples / total).add_(x.pow(2).sum(dim=1).sum(dim=0) / total)
        if self.hessian is not None:
            flat = x.reshape(-1, x.shape[-1])
            self.hessian.mul_(self.nsamples / total).addmm_(flat.t(), flat, alpha=2.0 / total)
        self.nsamples = total
