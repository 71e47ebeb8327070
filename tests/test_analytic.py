"""The embedded analytic models: their denoisers are the exact posterior means, computed independently here."""

import numpy as np
import pytest
import torch

from backends import load_backend
from backends.analytic import load_digits_data, make_analytic


def brute_force_gmm(x, sigma, label=None, ridge=1e-3):
    """Posterior mean of the class-wise Gaussian mixture via dense solves (no eigenbasis, no torch)."""
    images, labels = load_digits_data()
    images, labels = images.reshape(len(images), -1).numpy(), labels.numpy()
    classes = range(10) if label is None else [label]
    logs, means = [], []
    for c in classes:
        members = images[labels == c]
        mu = members.mean(0)
        cov = np.cov(members, rowvar=False) + ridge * np.eye(64)
        noisy = cov + sigma ** 2 * np.eye(64)
        diff = x - mu
        sol = np.linalg.solve(noisy, diff)
        _, logdet = np.linalg.slogdet(noisy)
        logs.append(np.log(len(members) / len(images)) - 0.5 * diff @ sol - 0.5 * logdet)
        means.append(mu + cov @ sol)
    logs = np.array(logs)
    w = np.exp(logs - logs.max())
    return (w[:, None] * np.array(means)).sum(0) / w.sum()


def brute_force_empirical(x, sigma, label=None):
    images, labels = load_digits_data()
    images, labels = images.reshape(len(images), -1).numpy(), labels.numpy()
    if label is not None:
        images = images[labels == label]
    logits = np.array([-0.5 * np.sum((x - y) ** 2) / sigma ** 2 for y in images])
    w = np.exp(logits - logits.max())
    return (w[:, None] * images).sum(0) / w.sum()


@pytest.mark.parametrize("sigma", [0.01, 0.3, 2.0, 40.0])
def test_gmm_denoiser_is_the_exact_posterior_mean(gmm, sigma):
    rng = np.random.default_rng(1)
    images, _ = load_digits_data()
    x = images[:3].reshape(3, -1).numpy() + sigma * rng.standard_normal((3, 64))
    ours = gmm(torch.tensor(x).view(3, 1, 8, 8), torch.full((3,), sigma, dtype=torch.float64)).view(3, -1).numpy()
    for b in range(3):
        np.testing.assert_allclose(ours[b], brute_force_gmm(x[b], sigma), rtol=1e-7, atol=1e-9)
    labelled = gmm(torch.tensor(x).view(3, 1, 8, 8), torch.full((3,), sigma, dtype=torch.float64),
                   torch.tensor([2, -1, 5])).view(3, -1).numpy()
    np.testing.assert_allclose(labelled[0], brute_force_gmm(x[0], sigma, 2), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(labelled[1], ours[1], rtol=1e-12)
    np.testing.assert_allclose(labelled[2], brute_force_gmm(x[2], sigma, 5), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 5.0])
def test_empirical_denoiser_is_the_exact_posterior_mean(digits, sigma):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 64)) * (1 + sigma)
    ours = digits(torch.tensor(x).view(2, 1, 8, 8), torch.full((2,), sigma, dtype=torch.float64), torch.tensor([-1, 4]))
    ours = ours.view(2, -1).numpy()
    np.testing.assert_allclose(ours[0], brute_force_empirical(x[0], sigma), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours[1], brute_force_empirical(x[1], sigma, 4), rtol=1e-9, atol=1e-12)


def test_limits_and_memorisation(gmm, digits):
    images, _ = load_digits_data()
    big = torch.full((2,), 1e4, dtype=torch.float64)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    mean = images.mean(0)
    for model in (gmm, digits):                     # at huge noise the estimate is the data mean
        torch.testing.assert_close(model(x, big), mean.expand(2, 1, 8, 8), atol=1e-4, rtol=0)
    tiny = torch.full((1,), 1e-3, dtype=torch.float64)
    torch.testing.assert_close(digits(images[7:8], tiny), images[7:8])   # a data point is its own denoising


def test_cfg_is_one_batched_call_and_the_right_combination():
    guided, plain = make_analytic("gmm", guidance=3.0), make_analytic("gmm")
    calls = []
    original = guided.posterior_mean
    guided.posterior_mean = lambda x, s, l: calls.append(x.shape[0]) or original(x, s, l)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64) * 2
    sigma = torch.full((4,), 1.5, dtype=torch.float64)
    labels = torch.tensor([1, -1, 3, 8])
    out = guided(x, sigma, labels)
    assert calls == [8]                               # [uncond, cond] in one call
    uncond, cond = plain(x, sigma), plain(x, sigma, labels)
    torch.testing.assert_close(out[[0, 2, 3]], (uncond + 3.0 * (cond - uncond))[[0, 2, 3]])
    torch.testing.assert_close(out[1], uncond[1])     # unconditional rows are not guided


def test_prompts_dtype_determinism_and_errors(gmm):
    assert gmm.encode_prompts(["3", "a handwritten 7", "", " "]).tolist() == [3, 7, -1, -1]
    with pytest.raises(ValueError, match="several digits"):
        gmm.encode_prompts(["12"])
    with pytest.raises(ValueError, match="names no digit"):
        gmm.encode_prompts(["a cat"])
    with pytest.raises(ValueError, match="labels"):
        gmm(torch.zeros(2, 1, 8, 8), torch.ones(2), torch.tensor([1, 2, 3]))
    x = torch.randn(3, 1, 8, 8)
    out = gmm(x, torch.ones(3))
    assert out.dtype == torch.float32 and torch.equal(out, gmm(x, torch.ones(3)))
    assert load_backend("analytic", model="gmm").name == "gmm" and load_backend("digits").name == "digits"
    with pytest.raises(ValueError, match="unknown backend 'sd7'"):
        load_backend("sd7")
    with pytest.raises(ValueError, match="does not take option.*ridge"):
        load_backend("gmm", model_path="x")
