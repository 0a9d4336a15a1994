"""sigma = softplus(rho): torch's values to an ulp, sigmoid gradients, one computation per parameter state."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpcbnn.bnn.softplus import shared, softplus

GRID = torch.cat([torch.linspace(-80, 80, 20001), torch.linspace(-1e-3, 1e-3, 2001), torch.tensor([-700.0, 700.0])])


def exact(x: torch.Tensor) -> torch.Tensor:
    """softplus in float64 through torch's log1p (correctly rounded to within an ulp, unlike its softplus above 20)."""
    x = x.double()
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


@pytest.mark.parametrize("dtype,ulps", [(torch.float64, 2), (torch.float32, 3)])
def test_values_are_within_a_few_ulps_of_the_exact_softplus(dtype, ulps):
    x = GRID.to(dtype)
    if dtype == torch.float32:
        x = x[x > -80]  # below, softplus(x) ~ e^x is subnormal in float32
    got, want = softplus(x).double(), exact(x)
    assert torch.all((got - want).abs() <= ulps * torch.finfo(dtype).eps * want)


def test_the_gradient_is_the_sigmoid():
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(softplus, (x,))
    softplus(x).sum().backward()
    assert torch.allclose(x.grad, torch.sigmoid(x.detach()))


def test_inside_shared_a_parameter_is_computed_once_per_state_and_every_use_backpropagates():
    rho = nn.Parameter(torch.randn(1000, dtype=torch.float64))
    with shared():
        first, second = softplus(rho), softplus(rho)
        assert first.data_ptr() == second.data_ptr()  # one value
        (first.sum() + 2 * second.sum()).backward()
        assert torch.allclose(rho.grad, 3 * torch.sigmoid(rho.detach()))

        torch.optim.Adam([rho], lr=0.5).step()  # an in-place update: the kept value is stale
        after = softplus(rho)
        assert after.data_ptr() != first.data_ptr()
        assert torch.allclose(after, exact(rho.detach()), rtol=1e-15, atol=0)


def test_outside_shared_nothing_is_kept_so_writes_behind_autograd_are_seen():
    rho = nn.Parameter(torch.zeros(10, dtype=torch.float64))
    before = softplus(rho)
    rho.data.fill_(1.0)  # no version bump, as an in-place broadcast by a communication library
    assert torch.allclose(softplus(rho), exact(torch.ones(10)))
    assert softplus(rho).data_ptr() != before.data_ptr()
