"""The LM example runs (N=400): its returned numbers against answers computed here from its text
log-likelihoods ``log_liks[k, j] = log p(text_j | style k)``.

- One style wrote every text (uniform prior): after t texts the posterior is softmax_k Σ_{j≤t}
  log_liks[k, j]; the sequential updates and batch enumeration match it within 1e-5, and
  log p(stream) = logsumexp_k Σ_j log_liks[k, j] − log K within 1e-3 (float32).
- Mixture proportions w ~ Dirichlet(1, 1, 1), one style per text: IBIS's E[w] within 0.12 of the
  exact posterior mean after every text (its sd ≤ 0.25/√(400/5) ≈ 0.028 with inefficiency ≤ 5, so
  0.12 is > 4 of those sds; over 30 seeds the largest error was 0.039), and IBIS's log Ẑ within 0.3
  of the exact evidence Σ_z p(z) Π_j p(text_j | z_j) enumerated here over all 3^6 assignments (over
  30 seeds the error had sd 0.072, |error| ≤ 0.23).
"""

import importlib.util
import itertools
from pathlib import Path

import numpy as np
from scipy.special import gammaln, logsumexp, softmax

ROOT = Path(__file__).resolve().parents[1]


def exact_mixture(log_liks: np.ndarray) -> tuple[float, np.ndarray]:
    """``(log p(texts), E[w | texts])`` of the mixture model, by enumerating every assignment z."""
    k, j = log_liks.shape
    terms, means = [], []
    for z in itertools.product(range(k), repeat=j):
        counts = np.bincount(z, minlength=k)
        log_prior = gammaln(k) - gammaln(k + j) + np.sum(gammaln(1 + counts))  # Dirichlet(1)-multinomial
        terms.append(log_prior + sum(log_liks[zi, i] for i, zi in enumerate(z)))
        means.append((1 + counts) / (k + j))  # E[w | z]
    terms = np.asarray(terms)
    return float(logsumexp(terms)), softmax(terms) @ np.asarray(means)


def test_updates_lm_style_example(capsys):
    path = ROOT / "examples" / "updates_lm_style.py"
    spec = importlib.util.spec_from_file_location("updates_lm_style", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(num_particles=400)
    assert "t=6:" in capsys.readouterr().out
    log_liks, history = out["log_liks"], out["history"]
    num_styles, num_texts = log_liks.shape
    assert (num_styles, num_texts) == (3, 6) and np.all(np.isfinite(log_liks)) and np.all(log_liks < 0)
    for name in history:
        assert history[name].shape == (num_texts, num_styles)
    cumulative = np.cumsum(log_liks, axis=1).T  # [t, k]: Σ_{j≤t} log_liks[k, j]
    exact_style = softmax(cumulative, axis=1)
    np.testing.assert_allclose(history["style"], exact_style, atol=1e-5)
    np.testing.assert_allclose(history["style_exact"], exact_style, atol=1e-5)
    log_z = logsumexp(cumulative[-1]) - np.log(num_styles)
    assert abs(out["log_z"] - log_z) < 1e-3 and abs(out["log_z_batch"] - log_z) < 1e-3

    exact = [exact_mixture(log_liks[:, : t + 1]) for t in range(num_texts)]
    w_exact = np.asarray([mean for _, mean in exact])
    np.testing.assert_allclose(history["w_exact"], w_exact, atol=1e-6)
    np.testing.assert_allclose(history["w"].sum(1), 1.0, atol=1e-5)
    assert np.max(np.abs(history["w"] - w_exact)) < 0.12
    assert abs(out["ibis_log_z"] - exact[-1][0]) < 0.3
    assert 1.0 <= out["ibis_ess"] <= 400 + 1e-3
