"""LinearStats: Wanda's and SparseGPT's running statistics."""
import torch

from pruning.statistics import LinearStats


def test_running_means_match_the_definitions():
    torch.manual_seed(0)
    samples = torch.randn(5, 7, 6)  # 5 samples of 7 tokens, 6 input features
    stats = LinearStats.empty(6, hessian=True)
    stats.add_batch(samples[:2])
    stats.add_batch(samples[2:3])
    stats.add_batch(samples[3:].reshape(-1, 6), samples=2)  # a [tokens, in] call of 2 samples
    assert stats.nsamples == 5
    expected_norm = samples.pow(2).sum(dim=1).mean(dim=0)  # mean over samples of ||X_j||^2
    flat = samples.reshape(-1, 6)
    expected_h = 2.0 / 5 * flat.t() @ flat
    torch.testing.assert_close(stats.act_sq_norm, expected_norm)
    torch.testing.assert_close(stats.hessian, expected_h)


def test_without_hessian():
    stats = LinearStats.empty(3, hessian=False)
    stats.add_batch(torch.ones(1, 4, 3))
    assert stats.hessian is None and torch.equal(stats.act_sq_norm, torch.full((3,), 4.0))
