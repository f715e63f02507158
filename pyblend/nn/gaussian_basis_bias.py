"""``GaussianBasisBias``: the 3D pair bias of Uni-Mol / Transformer-M / MoleBlend (GaussianLayer + NonLinear
projection) as one fused op, with their parameter names so their checkpoints load.

Names, read from the public code:

- ``gbf.means``, ``gbf.stds`` (``nn.Embedding(1, K)``), ``gbf.mul``, ``gbf.bias`` (``nn.Embedding(n_types, 1)``):
  ``GaussianLayer`` in both lsj2408/Transformer-M ``Transformer-M/modules/transformer_m_layers.py`` and
  dptech-corp/Uni-Mol ``unimol/unimol/models/unimol.py``; inits uniform(0, 3), uniform(0, 3), 1, 0.
- ``gbf_proj.layer1``, ``gbf_proj.layer2`` (``nn.Linear``): Transformer-M's ``NonLinear``. Uni-Mol's
  ``NonLinearHead`` names them ``gbf_proj.linear1`` / ``gbf_proj.linear2``; :meth:`GaussianBasisBias.load_state_dict`
  accepts those too (renamed on load).

Differences from the public code: ``sqrt(2 pi)`` exactly (they write ``sqrt(2 * 3.14159)``, 4e-7 relative);
Transformer-M gives ``gbf.mul`` / ``gbf.bias`` ``padding_idx=0`` (row 0 gets no gradient there; here it does).
"""
from __future__ import annotations

import functools

from torch import Tensor, nn

from ..ops._checks import check_module_backend, check_positive_float, check_same_device
from ..ops.gaussian_basis_bias import gaussian_basis_bias

__all__ = ["GaussianBasisBias"]

_PAIR_TYPE_MODES = ("sum2", "single")


class _InitEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose ``reset_parameters`` gives the public layer's initialisation (``initializer``,
    e.g. U(0, 3) or a constant), so that resetting every submodule after ``to_empty()``, in any order, restores
    the construction's init rather than N(0, 1)."""

    def __init__(self, rows: int, cols: int, initializer, **factory):
        super().__init__(rows, cols, **factory)  # nn.Embedding's N(0, 1) draw, as the public layer's construction makes
        self.initializer = initializer

    def reset_parameters(self) -> None:
        initializer = getattr(self, "initializer", None)  # None inside nn.Embedding's own __init__
        if initializer is None:
            super().reset_parameters()
        else:
            initializer(self.weight)


class _GaussianLayer(nn.Module):
    """The parameter holder of Uni-Mol / Transformer-M's ``GaussianLayer`` (same names and inits)."""

    def __init__(self, num_kernels: int, num_pair_types: int, **factory):
        super().__init__()
        self.means = _InitEmbedding(1, num_kernels, functools.partial(nn.init.uniform_, a=0, b=3), **factory)
        self.stds = _InitEmbedding(1, num_kernels, functools.partial(nn.init.uniform_, a=0, b=3), **factory)
        self.mul = _InitEmbedding(num_pair_types, 1, functools.partial(nn.init.constant_, val=1), **factory)
        self.bias = _InitEmbedding(num_pair_types, 1, functools.partial(nn.init.constant_, val=0), **factory)
        for table in (self.means, self.stds, self.bias, self.mul):  # the public code's order of draws
            table.reset_parameters()


class _NonLinear(nn.Module):
    """The parameter holder of Transformer-M's ``NonLinear``: Linear(K, hidden) -> GELU -> Linear(hidden, H)."""

    def __init__(self, num_kernels: int, num_heads: int, hidden: int, **factory):
        super().__init__()
        self.layer1 = nn.Linear(num_kernels, hidden, **factory)
        self.layer2 = nn.Linear(hidden, num_heads, **factory)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Uni-Mol's NonLinearHead calls the same two linears linear1 / linear2.
        for ours, theirs in (("layer1", "linear1"), ("layer2", "linear2")):
            for leaf in ("weight", "bias"):
                key = f"{prefix}{theirs}.{leaf}"
                if key in state_dict and f"{prefix}{ours}.{leaf}" not in state_dict:
                    state_dict[f"{prefix}{ours}.{leaf}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GaussianBasisBias(nn.Module):
    """Positions and atom-pair types -> per-head attention bias and per-atom 3D features (see
    :func:`pyblend.ops.gaussian_basis_bias` for the formula).

    Args:
        num_heads: H, the bias's heads.
        num_kernels: K Gaussians (128 in every public model).
        num_pair_types: rows of ``gbf.mul`` / ``gbf.bias`` (Uni-Mol: dictionary size squared; Transformer-M
            512 * 3).
        hidden: width of the MLP's hidden layer (None: K, as the public code).
        std_eps: added to ``|stds|``: 1e-2 (Transformer-M, MoleBlend) or 1e-5 (Uni-Mol).
        pair_type_mode: "sum2" (``pair_types`` carry two ids per pair whose embeddings are summed,
            Transformer-M) or "single" (one id per pair, Uni-Mol).
        backend: passed to the op ("triton" | "reference" | None = automatic).
        device, dtype: where and in what dtype the parameters are created (torch's factory arguments).

    ``forward(positions, pair_types, mask=None, *, cu_seqlens=None, max_seqlen=None)`` returns
    ``(attn_bias, atom_features)``: padded ``(B, H, N, N)``, ``(B, N, K)``; packed ``(H, P)``, ``(T, K)``.
    """

    def __init__(self, num_heads: int, num_kernels: int = 128, num_pair_types: int = 1024, hidden: int | None = None,
                 std_eps: float = 1e-2, pair_type_mode: str = "sum2", backend: str | None = None, *,
                 device=None, dtype=None):
        super().__init__()
        for name, value in (("num_heads", num_heads), ("num_kernels", num_kernels),
                            ("num_pair_types", num_pair_types), ("hidden", hidden if hidden is not None else 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int; got {value!r}")
        if pair_type_mode not in _PAIR_TYPE_MODES:
            raise ValueError(f"pair_type_mode: expected one of {_PAIR_TYPE_MODES}; got {pair_type_mode!r}")
        # Checked here as the op checks them, rather than at the first forward.
        check_positive_float(std_eps, "std_eps")
        check_module_backend(backend, "gaussian_basis_bias")
        self.num_heads, self.num_kernels = num_heads, num_kernels
        self.num_pair_types = num_pair_types
        self.hidden = num_kernels if hidden is None else hidden
        self.std_eps = float(std_eps)
        self.pair_type_mode = pair_type_mode
        self.backend = backend
        self.gbf = _GaussianLayer(num_kernels, num_pair_types, device=device, dtype=dtype)
        self.gbf_proj = _NonLinear(num_kernels, num_heads, self.hidden, device=device, dtype=dtype)

    def forward(self, positions: Tensor, pair_types: Tensor, mask: Tensor | None = None, *,
                cu_seqlens: Tensor | None = None, max_seqlen: int | None = None) -> tuple[Tensor, Tensor]:
        packed = cu_seqlens is not None
        per_pair_dims = (1 if packed else 3) + (self.pair_type_mode == "sum2")
        if hasattr(pair_types, "dim") and pair_types.dim() != per_pair_dims:
            want = {(False, "sum2"): "(B, N, N, 2)", (False, "single"): "(B, N, N)", (True, "sum2"): "(P, 2)",
                    (True, "single"): "(P,)"}[packed, self.pair_type_mode]
            raise ValueError(f"pair_types: pair_type_mode={self.pair_type_mode!r} expects {want}; got shape "
                             f"{tuple(pair_types.shape)}")
        gbf, proj = self.gbf, self.gbf_proj
        if isinstance(positions, Tensor):  # else the op would blame the parameters ("means: ... like positions")
            check_same_device(gbf.means.weight, "the module's parameters", positions=positions)
        return gaussian_basis_bias(positions, pair_types, gbf.means.weight.view(-1), gbf.stds.weight.view(-1),
                                   gbf.mul.weight, gbf.bias.weight, proj.layer1.weight, proj.layer1.bias,
                                   proj.layer2.weight, proj.layer2.bias, mask=mask, cu_seqlens=cu_seqlens,
                                   max_seqlen=max_seqlen, std_eps=self.std_eps, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kernels={self.num_kernels}, num_pair_types={self.num_pair_types}, "
                f"hidden={self.hidden}, std_eps={self.std_eps}, pair_type_mode={self.pair_type_mode!r}")
