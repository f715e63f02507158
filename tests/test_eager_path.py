"""The Triton ops' eager path (``pyblend.ops._autograd.call``): in plain eager mode an op's implementation and
autograd formula run without the dispatcher (torch.library's Python dispatch and autograd cost host time on every
call); under a dispatch mode, a torch-function mode or torch.compile, the registered op runs. Both paths give the
same outputs and gradients, bit for bit, and the autograd profiler still names the op."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyblend.ops import _autograd

from test_package import _TRITON_OPS, _kernel_op_call


def forward_backward(name):
    """Output and gradients of one op on seeded inputs (the Triton backend)."""
    torch.manual_seed(0)  # some of the inputs come from the global generator
    backend, call = _kernel_op_call(name)
    leaves = []
    out = call(lambda x: leaves.append(x.clone().requires_grad_()) or leaves[-1], backend)
    real = torch.view_as_real(out) if out.is_complex() else out
    weights = torch.linspace(-1, 1, real.numel()).view(real.shape)
    (grad,) = torch.autograd.grad((real * weights).sum(), leaves)
    return real.detach(), grad


@pytest.fixture
def ran_directly(monkeypatch):
    """The ops whose implementation ran without the dispatcher, in order."""
    ran, run = [], _autograd._run

    def spy(op, args):
        ran.append(op._qualname)
        return run(op, args)
    monkeypatch.setattr(_autograd, "_run", spy)
    return ran


@pytest.mark.parametrize("name", _TRITON_OPS)
def test_eager_path_matches_the_registered_op(name, ran_directly, monkeypatch):
    direct = forward_backward(name)
    family = "pyblend::" + name.removesuffix("_logits")
    assert all(op.startswith(family) for op in ran_directly), ran_directly
    assert any(op.endswith("_backward") for op in ran_directly) and len(ran_directly) >= 2, ran_directly
    ran_directly.clear()
    monkeypatch.setattr(_autograd, "_plain_eager", lambda op, args: False)
    dispatched = forward_backward(name)
    assert not ran_directly
    for got, want in zip(direct, dispatched):
        assert torch.equal(got, want)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_modes_see_the_registered_op(ran_directly):
    """A dispatch mode (FlopCounterMode, FakeTensorMode, a user's logger) sees pyblend's op, not its insides; a
    torch-function mode (``with torch.device(...)``) would reach the implementation's own tensor factories, so it
    also takes the registered op."""
    with _Recorder() as recorder:
        forward_backward("relation_attention")
    assert any(op.startswith("pyblend.relation_attention.") for op in recorder.ops), recorder.ops[:20]
    assert any(op.startswith("pyblend.relation_attention_backward.") for op in recorder.ops)
    with torch.device("cpu"):
        forward_backward("relation_attention")
    assert "pyblend::relation_attention" not in ran_directly


def test_profiler_names_the_op_on_the_eager_path(ran_directly):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        forward_backward("relation_attention")
    names = {event.name for event in profile.events()}
    assert {"pyblend::relation_attention", "pyblend::relation_attention_backward"} <= names
    assert "pyblend::relation_attention" in ran_directly


def test_no_graph_is_recorded_without_gradients(ran_directly):
    """With no input requiring a gradient (or under no_grad) the implementation runs alone: no autograd node."""
    backend, call = _kernel_op_call("relation_attention")
    out = call(lambda x: x, backend)
    assert out.grad_fn is None and ran_directly == ["pyblend::relation_attention"]
    with torch.no_grad():
        out = call(lambda x: x.requires_grad_(), backend)
    assert out.grad_fn is None and not out.requires_grad
