"""``pyblend.set_value_checks``: with value checks off the ops read no tensor values on the host (so no GPU
synchronisation: the CPU can queue kernels ahead of the GPU) and compute what they compute with checks on; what
only values reveal goes unchecked, as under torch.compile."""
import pytest
import torch

import pyblend
from pyblend import collate, ops

from graphs import backend_device
from host_reads import recorded_host_reads
from tolerances import assert_close

HAS_CUDA = torch.cuda.is_available()


def test_a_function_and_a_context_manager():
    assert pyblend.value_checks_enabled()
    with pyblend.set_value_checks(False):
        assert not pyblend.value_checks_enabled()
        with pyblend.set_value_checks(True):
            assert pyblend.value_checks_enabled()
        assert not pyblend.value_checks_enabled()
    assert pyblend.value_checks_enabled()
    pyblend.set_value_checks(False)
    try:
        assert not pyblend.value_checks_enabled()
    finally:
        pyblend.set_value_checks(True)
    with pytest.raises(TypeError, match="enabled: expected a bool; got 0"):
        pyblend.set_value_checks(0)
    assert pyblend.value_checks_enabled()


def test_the_setting_belongs_to_a_thread():
    """As grad mode: threads running models side by side (nn.DataParallel) cannot turn each other's checks off,
    nor leave them off by restoring out of order."""
    import threading

    seen = []
    with pyblend.set_value_checks(False):
        thread = threading.Thread(target=lambda: seen.append(pyblend.value_checks_enabled()))
        thread.start()
        thread.join()
        assert not pyblend.value_checks_enabled()
    assert seen == [True] and pyblend.value_checks_enabled()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_what_goes_unchecked(backend):
    """Packed calls must pass max_seqlen (cu_seqlens is not read); ids outside the table, refused with checks on,
    add no bias with checks off (the kernel masks them, as under torch.compile)."""
    device = backend_device(backend)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 2, 8, generator=generator).to(device) for _ in range(3))
    cu_seqlens = torch.tensor([0, 3, 5], dtype=torch.int32, device=device)
    with pyblend.set_value_checks(False), pytest.raises(
            ValueError, match=r"max_seqlen: expected an int where cu_seqlens is not read \(torch.compile, meta or "
                              r"fake tensors, pyblend.set_value_checks\(False\)\); got None"):
        ops.relation_attention(q, k, v, cu_seqlens=cu_seqlens, backend=backend)
    table = torch.randn(4, 2, generator=generator).to(device)
    ids = torch.tensor([0, 1, 2, 3, 9, 3, 2, 1, 0, 1, 2, 3, 0], dtype=torch.int32, device=device)  # 9: outside
    options = dict(cu_seqlens=cu_seqlens, max_seqlen=3, rel_table=table, backend=backend)
    with pytest.raises(ValueError, match=r"rel_index: expected ids in \[0, 4\)"):
        ops.relation_attention(q, k, v, rel_index=ids, **options)
    with pyblend.set_value_checks(False):
        got = ops.relation_attention(q, k, v, rel_index=ids, **options)
    bias = torch.where((ids < 4)[None], table[ids.clamp(max=3)].T, 0.0)
    expected = ops.relation_attention(q, k, v, bias, **{**options, "rel_table": None})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def graphs():
    pytest.importorskip("rdkit", reason="the MoleBlend step runs on featurized molecules (RDKit)")
    from pyblend import featurize_many

    smiles = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "C1CC1C(=O)O", "[Na+].[Cl-]", "C"]
    return featurize_many(smiles, conformer=True, progress=False)[0]


def _moleblend_step(graphs, layout, backend, device, monkeypatch, layers=1):
    """``step(checks) -> (loss, gradients, host reads)`` of a small MoleBlend pretraining step (dropout on) with
    every op on ``backend``, relations built once outside."""
    from pyblend.models import MoleBlend, MoleBlendConfig

    monkeypatch.setenv("PYBLEND_BACKEND", backend)
    torch.manual_seed(0)
    config = MoleBlendConfig(layers=layers, dim=32, heads=4, ffn_dim=48, num_kernels=8, head_width=4,
                             max_distance=8)
    model = MoleBlend(config).to(device).train()
    relations = model.build_relations(collate(graphs, layout=layout).to(device))

    def step(checks: bool):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # attention dropout's seed comes from torch's generator
        with pyblend.set_value_checks(checks), recorded_host_reads() as reads:
            loss, _ = model.relation_loss(relations, generator=torch.Generator(device).manual_seed(2))
            loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}, reads
    return step


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_moleblend_step_reads_no_value_and_matches(graphs, layout, backend, monkeypatch):
    """Every op of the step (relation attention with the SPD table, Gaussian-basis bias, path edge bias, blending,
    outer-product losses, noisy-node head): with checks on the step reads values on the host; off, only the
    attention dropout's seed, drawn from torch's CPU generator, which waits for no GPU.
    The results agree (the reference's masked means sum in another order)."""
    step = _moleblend_step(graphs, layout, backend, backend_device(backend), monkeypatch)
    loss_on, gradients_on, reads_on = step(True)
    loss_off, gradients_off, reads_off = step(False)
    assert reads_on, "the step should read values with checks on (else this test sees nothing)"
    assert all(" _dropout_seed " in read for read in reads_off), reads_off
    torch.testing.assert_close(loss_off, loss_on, rtol=1e-6, atol=1e-7)
    for name, gradient in gradients_on.items():
        torch.testing.assert_close(gradients_off[name], gradient, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_moleblend_checks_the_layers_shared_inputs_once(graphs, layout, monkeypatch):
    """Every layer's attention takes the same cu_seqlens and relation ids: the first layer checks them, the others
    do not read them again, so a deeper model makes no more host reads (checks on)."""
    reads = [len(_moleblend_step(graphs, layout, "reference", torch.device("cpu"), monkeypatch, layers)(True)[2])
             for layers in (1, 3)]
    assert reads[0] == reads[1] > 0, reads


def test_ops_with_masks_read_no_value():
    """The ops whose masks are read with checks on: gated fusion's presence (a sample with none is an error) and
    the Fourier cross-attention's token mask (one transform per token count)."""
    generator = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=generator).to(backend_device("triton"))  # noqa: E731
    present = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool, device=randn(1).device)
    token_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool, device=present.device)
    weights = dict(q_weight=randn(8, 4), kv_weight=randn(16, 6), out_weight=randn(4, 8))
    h, gates, scores, latent, tokens = randn(3, 4, 8), randn(3, 4, 8), randn(3, 4), randn(2, 3, 4), randn(2, 5, 6)
    calls = {
        "gated_fusion": lambda leaf: ops.gated_fusion(leaf(h), gates, scores, present=present, backend="triton")[0],
        "fourier_cross_attention": lambda leaf: torch.view_as_real(ops.fourier_cross_attention(
            leaf(latent), tokens, heads=2, token_mask=token_mask, backend="triton", **weights)),
    }
    for name, call in calls.items():
        results = []
        for checks in (True, False):
            leaves = []
            with pyblend.set_value_checks(checks), recorded_host_reads() as reads:
                out = call(lambda x: leaves.append(x.clone().requires_grad_()) or leaves[-1])
                (grad,) = torch.autograd.grad(out.square().sum(), leaves)
            assert bool(reads) == checks, (name, checks, reads)
            results.append((out.detach(), grad))
        # Off, the Fourier op's token FFT takes another algorithm (Bluestein for every length at once, not one FFT
        # per length), so the two agree to float32 rounding: measured as the suite measures it, by the norm. An
        # element of the latent's gradient differed by 4.3e-6 of 0.19, where each path's own error against the
        # float64 reference is 2e-6 of the norm (PyTorch float32's, 1.6e-6).
        for got, want, what in zip(results[1], results[0], ("output", "gradient")):
            assert_close(got, want, torch.float32, f"{name} {what}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_gpu_moleblend_step_never_synchronizes(graphs, layout, monkeypatch):
    """On the GPU, with checks off, the whole step (Triton kernels, forward and backward) never waits for the
    device: torch's sync debug mode raises on any synchronisation, boolean-mask indexing and the like included."""
    step = _moleblend_step(graphs, layout, "triton", torch.device("cuda"), monkeypatch)
    step(True)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
