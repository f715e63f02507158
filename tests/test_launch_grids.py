"""Launch grids within CUDA's limits at batch sizes past them.

CUDA caps grid axes 1 and 2 at 65535 programs (axis 0 at 2^31 - 1), and Triton launches whatever grid it is
given, so a kernel with molecules on axis 1 failed with "invalid argument" at 65536 molecules: a bulk inference
call on small molecules. The launchers run here on CPU tensors with their launches recorded (tests/hopper.py),
and the kernels they launch are compiled for sm_90: no GPU, and nothing runs.
"""
from hopper import run_compile_script

MOLECULES = 70_000
CUDA_GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)

GRIDS = f"""
import torch
from hopper import captured_launches, lower_launch
from pyblend.kernels import fourier_cross_attention, gaussian_basis_bias, relation_attention

BATCH = {MOLECULES}
grids = []
with captured_launches(grids) as captured:
    # Relation attention, 2 atoms and 2 heads, a bias broadcast over the heads (its dBias has a kernel of its own).
    q = torch.randn(BATCH, 2, 2, 16, dtype=torch.float16)
    bias = torch.randn(BATCH, 1, 2, 2, dtype=torch.float16)
    problem = (bias, None, None, None, None, 2, 0.25, 0.0, 0)
    out, lse, _ = relation_attention.relation_attention_forward(q, q, q, *problem, False)
    relation_attention.relation_attention_backward(torch.randn_like(out), None, q, q, q, out, lse, *problem, True,
                                                   False)
    # The Gaussian-basis bias: 2 atoms, K = 16, 4 heads.
    positions, types = torch.randn(BATCH, 2, 3), torch.randint(0, 5, (BATCH, 2, 2, 2))
    weights = [torch.randn(*shape) for shape in ((16,), (16,), (5,), (5,), (16, 16), (16,), (4, 16), (4,))]
    layout = (None, None, 2, 1e-2)
    attn, feat = gaussian_basis_bias.gaussian_basis_bias_forward(positions, types, *weights, *layout)
    gaussian_basis_bias.gaussian_basis_bias_backward(torch.randn_like(attn), torch.randn_like(feat), positions, types,
                                                     *weights, *layout)
    # Fourier cross-attention: an 8 x 8 latent, 2 tokens, 2 heads of 16 (B * H on the backward's grids).
    heads, width, dim = 2, 32, 8
    latent, kv = torch.randn(BATCH, dim, dim, 2), torch.randn(BATCH, 2, 2 * width, dtype=torch.bfloat16)
    weights = [torch.randn(*shape) for shape in ((width, dim), (dim, width), (dim,), (dim,), (dim,))]
    _, _, o, lse, _, _ = fourier_cross_attention.fourier_cross_attention_forward(
        latent, kv, None, *weights, None, None, None, None, None, None, heads, 0.25, 2, True, True, False, True, 1e-5)
    fourier_cross_attention.fourier_cross_attention_attention_backward(
        torch.randn_like(o), torch.randn_like(o), lse, torch.randn(BATCH, heads, dim), kv, None, heads, 0.25)
for name, grid in grids:
    print(name, *grid)
# The flat grids' kernels (their own variant: the program id is split in the kernel) compile for sm_90.
lowered = set()
for kernel, args, kwargs in captured:
    if kernel.fn.__name__ not in lowered:
        lowered.add(kernel.fn.__name__)
        lower_launch(kernel, args, kwargs)
print("compiled", len(lowered))
"""


def test_grids_stay_within_cuda_limits_past_65535_molecules():
    *lines, compiled = run_compile_script(GRIDS)
    launched = {line.split()[0] for line in lines}
    assert compiled == f"compiled {len(launched)}", compiled
    assert launched >= {"_relation_attention_fwd_kernel", "_relation_attention_bwd_q_kernel",
                        "_relation_attention_bwd_kv_kernel", "_relation_attention_bwd_bias_kernel",
                        "_gaussian_basis_bias_fwd_kernel", "_gaussian_basis_bias_bwd_positions_kernel",
                        "_fca_fwd_kernel", "_fca_out_kernel", "_fca_bwd_dq_kernel", "_fca_bwd_dkv_kernel"}, lines
    for line in lines:
        name, *grid = line.split()
        assert all(int(size) <= limit for size, limit in zip(grid, CUDA_GRID_LIMITS)), line
