"""Triton kernels and their launchers (importable as ``pyblend.kernels``).

Kernels only: grids, block sizes and strides. No autograd, no modules, and nothing imported from pyblend.
Modules here import Triton, so pyblend imports them only when a Triton backend runs.
"""
