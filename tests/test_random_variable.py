"""Random variables and the tracing transformations (tape, condition, log_joint)."""

import math

import numpy as np
import pytest
import torch

from hpcbnn.ppl.random_variable import Bernoulli, HalfNormal, Normal, RandomVariable, random_variable
from hpcbnn.ppl.tracing import condition, log_joint, tape, trace, traceable


def regression(x: torch.Tensor) -> RandomVariable:
    """y ~ N(x w, s^2), w ~ N(0, 1) iid, s ~ HalfNormal(2); broadcasts over leading chain dims."""
    w = Normal(torch.zeros(x.shape[1], dtype=x.dtype), 1.0, name="w")
    s = HalfNormal(torch.tensor(2.0, dtype=x.dtype), name="s")
    mean = (w[..., None, :] * x).sum(-1)
    return Normal(mean, s[..., None], name="y")


def hand_written(x, w, s, y):
    def normal(v, m, sd):
        return -0.5 * ((v - m) / sd) ** 2 - math.log(math.sqrt(2 * math.pi)) - np.log(sd)

    lp_w = normal(w, 0.0, 1.0).sum()
    lp_s = math.log(2) + normal(s, 0.0, 2.0)
    lp_y = normal(y, x @ w, s).sum()
    return lp_w + lp_s + lp_y


def test_random_variable_behaves_like_its_value():
    loc = torch.tensor([1.0, -2.0], requires_grad=True)
    rv = Normal(loc, 0.5, sample_shape=(3,), name="z")
    assert isinstance(rv.distribution, torch.distributions.Normal) and rv.name == "z"
    assert rv.shape == (3, 2) and rv.dtype == torch.float32 and rv.device.type == "cpu"
    v = rv.value
    assert torch.equal(rv + 1, v + 1) and torch.equal(1 - rv, 1 - v) and torch.equal(rv * rv, v * v)
    assert torch.equal(torch.exp(rv), v.exp()) and torch.equal(torch.ones(3) @ rv, torch.ones(3) @ v)
    assert torch.equal(rv[1], v[1]) and len(rv) == 3
    assert torch.equal(torch.nn.functional.linear(torch.ones(1, 2), rv), torch.ones(1, 2) @ v.T)
    plain = Normal(torch.zeros(2), 1.0)
    assert np.array_equal(np.asarray(plain), plain.value.numpy()) and float(plain[0]) == plain.value[0].item()
    rv.sum().backward()
    assert torch.equal(loc.grad, torch.full((2,), 3.0)), "Normal values must be reparameterised"


def test_given_value_is_kept_and_scored():
    rv = Bernoulli(probs=torch.tensor([0.2, 0.9]), value=torch.tensor([1.0, 0.0]))
    assert torch.equal(rv.value, torch.tensor([1.0, 0.0]))
    assert torch.allclose(rv.log_prob(), torch.log(torch.tensor([0.2, 0.1])))
    wrapped = random_variable(torch.distributions.Independent(torch.distributions.Normal(torch.zeros(4), 1.0), 1))
    assert wrapped.shape == (4,) and wrapped.log_prob().shape == ()


def test_tape_records_every_named_variable_in_order():
    x = torch.randn(5, 3)
    with tape() as t:
        y = regression(x)
    assert list(t) == ["w", "s", "y"]
    assert t["y"] is y and t["w"].shape == (3,)
    assert torch.allclose(t["y"].distribution.loc, x @ t["w"].value)


def test_condition_fixes_values_as_function_and_as_context():
    x = torch.randn(5, 3)
    w = torch.tensor([1.0, 2.0, 3.0])
    with tape() as t:
        condition(regression, w=w, s=0.1)(x)
    assert torch.equal(t["w"].value, w) and float(t["s"]) == pytest.approx(0.1)
    assert torch.allclose(t["y"].distribution.loc, x @ w)
    with condition(y=torch.zeros(5)), tape() as t:
        regression(x)
    assert torch.equal(t["y"].value, torch.zeros(5))


def test_log_joint_equals_hand_written_density():
    x = torch.randn(6, 3, dtype=torch.float64)
    w, s, y = torch.randn(3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    got = log_joint(regression)(x, w=w, s=s, y=y)
    want = hand_written(x.numpy(), w.numpy(), s.item(), y.numpy())
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_log_joint_scores_a_batch_of_chains_in_one_pass():
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, dtype=torch.float64)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    s = torch.rand(4, dtype=torch.float64) + 0.5
    batched = log_joint(regression, batch_dims=1)(x, w=w, s=s, y=y)
    assert batched.shape == (4,)
    single = torch.stack([log_joint(regression)(x, w=w[c], s=s[c], y=y) for c in range(4)])
    assert torch.allclose(batched, single, rtol=1e-12)
    (grad,) = torch.autograd.grad(batched.sum(), w)
    assert torch.allclose(grad, -w + ((y - (w[:, None, :] * x).sum(-1)) / s[:, None] ** 2) @ x, rtol=1e-10)


def test_log_joint_rejects_missing_and_unknown_values():
    x = torch.randn(2, 3)
    with pytest.raises(LookupError, match="'y'"):
        log_joint(regression)(x, w=torch.zeros(3), s=torch.tensor(1.0))
    with pytest.raises(TypeError, match="sigma"):
        log_joint(regression)(x, w=torch.zeros(3), s=torch.tensor(1.0), y=torch.zeros(2), sigma=1.0)


def test_tracers_nest_innermost_first():
    calls = []

    def spy(label):
        def tracer(f, *args, **kwargs):
            calls.append(label)
            return traceable(f)(*args, **kwargs)
        return tracer

    with trace(spy("outer")), trace(spy("inner")):
        Normal(0.0, 1.0)
    assert calls == ["inner", "outer"]
    Normal(0.0, 1.0)
    assert calls == ["inner", "outer"], "no tracer may stay on the stack after its block"
