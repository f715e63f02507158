"""The Triton ops' autograd beyond torch.library's: the torch.func transforms, and a plain refusal of what it does
not cover.

Each op's backward is a custom op of its own (``pyblend::<op>_backward``) with a first-order formula only. Left
alone, a second differentiation through it (``create_graph=True``, then a loss on that gradient, as training on
forces does) fails with PyTorch's advice to register a formula on pyblend's internal op; instead it names the op
and the way out.
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
        return op(*args)

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


def call(op, *args):
    """``op(*args)`` for a custom op with a registered autograd formula, every argument positional. Under a
    ``torch.func`` transform (``grad``, ``vjp``, ``jacrev``, ``vmap``) it goes through ``_UnderTransform`` so the
    same formula differentiates it there too; elsewhere (eager autograd, torch.compile) it is the plain call. (The
    formula is read from the CustomOpDef's private attributes: where a PyTorch release lacks them, the transforms
    get the plain call and PyTorch's refusal, as before.)"""
    if (not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None
            and getattr(op, "_setup_context_fn", None) is not None and getattr(op, "_backward_fn", None) is not None):
        return _UnderTransform.apply(*args, op)
    return op(*args)


__all__ = ["call", "refuse_double_backward"]
