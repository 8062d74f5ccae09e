"""Karras et al. 2022 (EDM) on tinydiff's SDEs: the scaled noise level sigma(t) = std(t) / m(t)
and its inverse, the power-law schedule, and the Heun samplers (deterministic and stochastic),
all checked against exact answers (closed forms, or the exact recursion of a linear score).
"""
import math

import numpy as np
import pytest

from tinydiff.sde import SDE, BrownianSDE, VESDE, VPSDE, make_sde, subVPSDE

ALL_SDES = [VESDE(25.0), VPSDE(), subVPSDE(), BrownianSDE(2.0), VESDE(3.0), VPSDE(0.0, 5.0),
            VPSDE(3.0, 3.0), subVPSDE(0.5, 8.0)]
IDS = [repr(s) for s in ALL_SDES]


# -- sigma(t) and its inverse ------------------------------------------------------------------

@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_time_of_scaled_std_inverts_scaled_std(sde):
    t = np.geomspace(1e-5, 1.0, 200)
    sigma = sde.scaled_std(t)
    np.testing.assert_allclose(sigma, sde.marginal_std(t) / sde.marginal_mean_coeff(t), rtol=1e-15)
    assert (np.diff(sigma) > 0).all()                          # increasing in t
    back = sde.time_of_scaled_std(sigma)
    np.testing.assert_allclose(back, t, rtol=1e-10, atol=0)
    assert (np.diff(back) > 0).all()
    # the base class's bisection (the fallback for a future SDE) agrees with the closed form
    np.testing.assert_allclose(SDE.time_of_scaled_std(sde, sigma), t, rtol=1e-10, atol=0)
    # floats in, floats out, and sigma = 0 is t = 0
    for tf in (1e-5, 0.37, 1.0):
        got = sde.time_of_scaled_std(float(sde.scaled_std(tf)))
        assert isinstance(got, float) and abs(got - tf) <= 1e-10 * tf
    assert sde.time_of_scaled_std(0.0) == 0.0 and SDE.time_of_scaled_std(sde, 0.0) == 0.0


def test_scaled_std_closed_forms():
    # sigma^2 = exp(B) - 1 (VP), sigma = 2 sinh(B / 2) (sub-VP), sigma = std (VE, Brownian)
    t = np.linspace(0.01, 1, 7)
    vp, sub = VPSDE(), subVPSDE()
    np.testing.assert_allclose(vp.scaled_std(t) ** 2, np.expm1(vp.integrated_beta(t)), rtol=1e-13)
    np.testing.assert_allclose(sub.scaled_std(t), 2 * np.sinh(sub.integrated_beta(t) / 2), rtol=1e-13)
    ve = VESDE(25.0)
    np.testing.assert_allclose(ve.scaled_std(t), ve.marginal_std(t), rtol=0)
    assert abs(ve.scaled_std(1.0) - ve.prior_std) < 1e-12
    np.testing.assert_allclose(vp.time_of_integrated_beta(vp.integrated_beta(t)), t, rtol=1e-13)


def test_time_of_scaled_std_refuses_bad_noise_levels():
    for sde in (VESDE(25.0), make_sde("vp")):
        for bad in (-1.0, float("nan"), np.array([0.1, -0.2])):
            with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
                sde.time_of_scaled_std(bad)
    with pytest.raises(ValueError, match="above sigma"):
        SDE.time_of_scaled_std(VESDE(25.0), 20.0)
