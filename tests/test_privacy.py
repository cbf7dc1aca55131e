"""Privacy accounting: Opacus' accountants with our inputs, checked once against the exact Gaussian mechanism."""

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from gradinv.client import accounting as privacy
from gradinv.errors import ConfigError

DELTA = 1e-5


def analytic_gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """The exact epsilon of one Gaussian release at sensitivity 1 (Balle & Wang 2018, Theorem 8):
    delta(eps) = Phi(1/(2s) - eps*s) - e^eps * Phi(-1/(2s) - eps*s), solved for eps."""
    s = noise_multiplier

    def excess(eps: float) -> float:
        return norm.cdf(1 / (2 * s) - eps * s) - math.exp(eps) * norm.cdf(-1 / (2 * s) - eps * s) - delta

    return brentq(excess, 0.0, 200.0, xtol=1e-12)


@pytest.mark.parametrize("accountant", privacy.ACCOUNTANTS)
@pytest.mark.parametrize("noise, rate, steps", [(1.0, 1.0, 1), (0.8, 0.25, 5), (2.0, 0.5, 3)])
def test_epsilon_is_opacus_accountant_called_directly(accountant, noise, rate, steps):
    from opacus.accountants import PRVAccountant, RDPAccountant

    direct = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    for _ in range(steps):
        direct.step(noise_multiplier=noise, sample_rate=rate)
    with np.errstate(divide="ignore"):
        expected = direct.get_epsilon(DELTA)
    assert privacy.epsilon(noise, rate, steps, DELTA, accountant) == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("noise", [0.5, 1.0, 2.0, 5.0])
def test_one_release_against_the_analytic_gaussian_mechanism(noise):
    exact = analytic_gaussian_epsilon(noise, DELTA)
    rdp = privacy.gaussian_mechanism_epsilon(noise, DELTA)
    # RDP converts to (eps, delta) loosely: measured 1.073x (s 0.5) to 1.095x (s 5) the exact value.
    assert exact <= rdp <= 1.15 * exact
    # PRV is numerically exact up to its eps_error (0.01): measured 0.0100 to 0.0105 above the exact value.
    prv = privacy.gaussian_mechanism_epsilon(noise, DELTA, "prv")
    assert exact - 0.02 <= prv <= exact + 0.02
    assert rdp == privacy.epsilon(noise, 1.0, 1, DELTA)


def test_more_noise_fewer_steps_and_sampling_all_lower_epsilon():
    base = privacy.epsilon(1.0, 0.5, 4, DELTA)
    assert privacy.epsilon(2.0, 0.5, 4, DELTA) < base
    assert privacy.epsilon(1.0, 0.5, 1, DELTA) < base
    assert privacy.epsilon(1.0, 0.1, 4, DELTA) < base


@pytest.mark.parametrize("accountant", privacy.ACCOUNTANTS)
def test_no_noise_is_infinite_epsilon(accountant):
    assert privacy.epsilon(0.0, 0.5, 3, DELTA, accountant) == math.inf
    assert privacy.gaussian_mechanism_epsilon(0.0, DELTA, accountant) == math.inf


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: privacy.epsilon(-1.0, 1.0, 1, DELTA), "dp_noise"),
        (lambda: privacy.epsilon(1.0, 0.0, 1, DELTA), "dp_sample_rate"),
        (lambda: privacy.epsilon(1.0, 1.5, 1, DELTA), "dp_sample_rate"),
        (lambda: privacy.epsilon(1.0, 1.0, 0, DELTA), "steps"),
        (lambda: privacy.epsilon(1.0, 1.0, 1, 0.0), "dp_delta"),
        (lambda: privacy.epsilon(1.0, 1.0, 1, DELTA, "gdp"), "accountant"),
    ],
)
def test_bad_inputs_are_one_line_config_errors(call, field):
    with pytest.raises(ConfigError) as raised:
        call()
    assert raised.value.field == field and "\n" not in str(raised.value)


def test_importing_privacy_loads_no_torch():
    code = "import sys, gradinv.client.accounting; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
