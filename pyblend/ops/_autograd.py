"""The Triton ops' autograd beyond torch.library's: the torch.func transforms, an eager path with less host
overhead, and a plain refusal of what it does not cover.

Each op's backward is a custom op of its own (``pyblend::<op>_backward``) with a first-order formula only. Left
alone, a second differentiation through it (``create_graph=True``, then a loss on that gradient, as training on
forces does) fails with PyTorch's advice to register a formula on pyblend's internal op; instead it names the op
and the way out.

In plain eager calls (no torch.compile, no torch.func transform, no dispatch or torch-function mode, plain tensors)
:func:`call` runs the op's implementation and formulas without the dispatcher: torch.library's Python autograd
and dispatch cost about 120 us of host time per forward + backward of relation attention (measured here with the
kernels stubbed out: 226 us through the custom op, 104 us through an autograd.Function), more than the GPU needs
for a batch of a thousand drug-like molecules. Everything else (compile, opcheck, fake and meta tensors, tensor
subclasses, FlopCounterMode) still goes through the registered op.
"""
from __future__ import annotations

import torch


def refuse_double_backward(backward_op, op: str) -> None:
    """Give ``backward_op`` (a custom op) a derivative that raises a RuntimeError naming ``op`` and the reference
    backend, which has every order of derivative."""
    def setup_context(ctx, inputs, output) -> None:
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"{op}: the Triton path has first-order gradients only; a gradient of its gradient "
                           "(create_graph=True, then a second differentiation) needs backend='reference'")

    backward_op.register_autograd(backward, setup_context=setup_context)


class _UnderTransform(torch.autograd.Function):
    """A custom op's own ``register_autograd`` formula as an autograd.Function with ``setup_context``, which the
    ``torch.func`` transforms need and torch.library's generated one lacks (``grad``/``vjp``/``jacrev`` refuse
    it). Inputs: the op's arguments, then the op (a CustomOpDef)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        *args, op = inputs
        return _tracked(op(*args))

    @staticmethod
    def setup_context(ctx, inputs, output):
        *args, op = inputs
        ctx.pyblend_backward = op._backward_fn
        op._setup_context_fn(ctx, tuple(args), output)

    @staticmethod
    def backward(ctx, *grads):
        needs_input_grad = ctx.needs_input_grad
        ctx.needs_input_grad = needs_input_grad[:-1]  # the formula sees the op's own arguments, as registered
        try:
            grads = ctx.pyblend_backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs_input_grad
        return (*grads, None) if isinstance(grads, tuple) else (grads, None)


class _Eager(torch.autograd.Function):
    """The same formulas in plain eager mode, with the op's implementation called directly (no dispatcher). The
    forward takes ``ctx`` and runs the op's ``setup_context`` itself: with a separate ``setup_context``,
    ``Function.apply`` binds the arguments through ``inspect.signature`` on every call (~25 us here)."""

    @staticmethod
    def forward(ctx, *inputs):
        *args, op = inputs
        output = _tracked(_run(op, args))
        ctx.pyblend_backward = op._backward_fn
        op._setup_context_fn(ctx, tuple(args), output)
        return output

    backward = staticmethod(_UnderTransform.backward)


def _tracked(result):
    """An autograd.Function records the tensors it returns alone or in a tuple, not in a list (an op returning
    ``list[Tensor]``, as fourier_cross_attention's backward, would lose its graph)."""
    return tuple(result) if isinstance(result, list) else result


def _run(op, args):
    """The op's own implementation; under the autograd profiler inside a range named as the op."""
    if getattr(torch.autograd.profiler, "_is_profiler_enabled", False):
        with torch.profiler.record_function(op._qualname):
            return op._init_fn(*args)
    return op._init_fn(*args)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(op, args) -> bool:
    """Whether ``op(*args)`` may skip the dispatcher: nothing is tracing, transforming or intercepting it, and
    every tensor is a plain one with values (not meta, fake, functional or another subclass)."""
    if (torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
            or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or getattr(op, "_init_fn", None) is None):
        return False
    return all(type(a) in _PLAIN_TENSORS and not a.is_meta for a in args if isinstance(a, torch.Tensor))


def call(op, *args):
    """``op(*args)`` for a custom op with a registered autograd formula, every argument positional. Under a
    ``torch.func`` transform (``grad``, ``vjp``, ``jacrev``, ``vmap``) it goes through ``_UnderTransform`` so the
    same formula differentiates it there too; in plain eager mode (see the module's docstring) through ``_Eager``,
    or straight to the implementation when no gradient is recorded; elsewhere (torch.compile, modes, subclasses)
    it is the plain call. (The formula is read from the CustomOpDef's private attributes: where a PyTorch release
    lacks them, every call is the plain call, and the transforms get PyTorch's refusal, as before.)"""
    formula = getattr(op, "_setup_context_fn", None) is not None and getattr(op, "_backward_fn", None) is not None
    if _plain_eager(op, args):
        if not torch.is_grad_enabled() or not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return _run(op, args)
        if formula:
            return _Eager.apply(*args, op)
    elif (formula and not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is not None):
        return _UnderTransform.apply(*args, op)
    return op(*args)


__all__ = ["call", "refuse_double_backward"]
