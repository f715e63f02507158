"""What the Triton ops' autograd does not cover, said plainly.

Each op's backward is a custom op of its own (``pyblend::<op>_backward``) with a first-order formula only. Left
alone, a second differentiation through it (``create_graph=True``, then a loss on that gradient, as training on
forces does) fails with PyTorch's advice to register a formula on pyblend's internal op; instead it names the op
and the way out.
"""
from __future__ import annotations


def refuse_double_backward(backward_op, op: str) -> None:
    """Give ``backward_op`` (a custom op) a derivative that raises a RuntimeError naming ``op`` and the reference
    backend, which has every order of derivative."""
    def setup_context(ctx, inputs, output) -> None:
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"{op}: the Triton path has first-order gradients only; a gradient of its gradient "
                           "(create_graph=True, then a second differentiation) needs backend='reference'")

    backward_op.register_autograd(backward, setup_context=setup_context)


__all__ = ["refuse_double_backward"]
