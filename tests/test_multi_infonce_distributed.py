"""Multi-pair InfoNCE across ranks: 2 CPU processes on gloo, each holding half of a global batch.

One spawn serves the module: every scenario runs in both children (Triton's interpreter and the reference), each
rank saves its loss and its gradients, and the tests compare them with the single-process op on the full batch
(float64 reference): the loss on every rank, each rank's local embedding gradients (rows ``r * M .. r * M + M - 1``
of the single-process gradients), and a learnable temperature's gradient summed over the ranks as DDP's
all-reduce would (DDP then divides by the world size; see :mod:`pyblend.ops.multi_infonce`). ``gather="no_grad"``
is checked against a hand-written expectation of the public MolBind code's gradient (F.cross_entropy of the local
rows against constant gathered copies, labels offset by rank). Also: masks passed on some ranks only (with value
checks on and off), ranks that disagree (local batch size, modalities, dtype, weights, requires_grad: the same
ValueError on every rank, and the group still usable after it), and DDP's scale (the loss times the world size
gives the single-process gradient, or with gather="no_grad" the public code's).
"""
import os
import tempfile
import time

import torch

if not torch.cuda.is_available():  # before anything imports triton (the children inherit the environment)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pyblend import ops, set_value_checks  # noqa: E402

from tolerances import RELATIVE_ERROR, assert_close  # noqa: E402

WORLD = 2
TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


# ------------------------------------------------------------------------------------------------ scenarios


def _scenarios(seed: int) -> dict:
    """name -> inputs over the GLOBAL batch (float64, NaN in absent rows) and the op's options."""
    generator = torch.Generator().manual_seed(seed)
    scenarios = {}

    def embeddings(batch, dims, masks):
        out = {}
        for name, dim in dims.items():
            x = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
            if name in masks:
                x[~masks[name]] = float("nan")
            out[name] = x
        return out

    # Three modalities, three pairs, missing samples in two (one rank holds no pocket at all), a learnable
    # temperature. Local batch 37: odd, one row block, two column blocks.
    global_batch = 2 * 37
    masks = {"graph": torch.rand(global_batch, generator=generator) < 0.8,
             "pocket": torch.arange(global_batch) < 30}
    masks["graph"][:2] = True
    dims = {"graph": 24, "text": 24, "pocket": 24}
    base = dict(embeddings=embeddings(global_batch, dims, masks), masks=masks,
                pairs=[("graph", "text"), ("text", "pocket"), ("graph", "pocket")], weights=[0.5, 0.3, 0.2],
                temperature=torch.tensor(0.07, dtype=torch.float64), normalize=True)
    for gather in ("autograd", "no_grad"):
        for backend in ("triton", "reference"):
            scenarios[f"masked-{gather}-{backend}"] = dict(base, gather=gather, backend=backend)
    # No masks, unnormalised, a float temperature; local batch 70: several row and column blocks.
    global_batch = 2 * 70
    plain = dict(embeddings=embeddings(global_batch, {"a": 16, "b": 16}, {}), masks=None,
                 pairs=[("a", "b")], weights=None, temperature=0.5, normalize=False)
    for backend in ("triton", "reference"):
        scenarios[f"plain-autograd-{backend}"] = dict(plain, gather="autograd", backend=backend)
    # gather=None: each rank on its own half, no communication.
    scenarios["masked-none-triton"] = dict(base, gather=None, backend="triton")
    # Masks on some ranks only: each rank passes only the masks with a missing sample in its half (graph's on rank
    # 0, text's on rank 1, pocket's on none), as a loader that adds a mask when a batch lacks a modality would.
    # The global masks are all True where a rank passes none: the single-process expectation. Also with value
    # checks off, where no header is read and every modality's mask is gathered.
    global_batch = 2 * 37
    half = torch.arange(global_batch) < 37
    sparse_masks = {"graph": (torch.rand(global_batch, generator=generator) < 0.8) | ~half,
                    "text": (torch.rand(global_batch, generator=generator) < 0.8) | half,
                    "pocket": torch.ones(global_batch, dtype=torch.bool)}
    sparse_masks["graph"][0] = sparse_masks["text"][-1] = False  # each rank has one missing at least
    sparse = dict(base, embeddings=embeddings(global_batch, dims, sparse_masks), masks=sparse_masks,
                  sparse_masks=True, gather="autograd")
    for backend in ("triton", "reference"):
        scenarios[f"sparse-masks-{backend}"] = dict(sparse, backend=backend)
    scenarios["sparse-masks-unchecked-triton"] = dict(sparse, backend="triton", value_checks=False)
    return scenarios


def _local_run(scenario: dict, rank: int, world: int) -> dict:
    """This rank's loss and gradients (float32 inputs: its rows of the global batch)."""
    batch = next(iter(scenario["embeddings"].values())).shape[0]
    local = batch // world
    rows = slice(rank * local, (rank + 1) * local)
    leaves = {name: x[rows].to(torch.float32).requires_grad_() for name, x in scenario["embeddings"].items()}
    masks = None if scenario["masks"] is None else {name: m[rows] for name, m in scenario["masks"].items()}
    if scenario.get("sparse_masks"):  # only the masks with a missing sample on this rank; None if there is none
        masks = {name: m for name, m in masks.items() if not m.all()} or None
    temperature = scenario["temperature"]
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(torch.float32).requires_grad_()
    with set_value_checks(scenario.get("value_checks", True)):
        loss = ops.multi_infonce(leaves, scenario["pairs"], weights=scenario["weights"], temperature=temperature,
                                 masks=masks, normalize=scenario["normalize"], backend=scenario["backend"],
                                 gather=scenario["gather"])
        loss.backward()
    found = {"loss": loss.detach()}
    found.update({f"d{name}": leaf.grad.detach() for name, leaf in leaves.items()})
    if isinstance(temperature, torch.Tensor):
        found["dtemperature"] = temperature.grad.detach()
    return found


def _double_backward_error(rank: int) -> str | None:
    """The error a gradient of the gradient through the autograd gather raises (None if none): its backward's
    collectives have no derivative, so it must refuse rather than give a second derivative without the other
    ranks' part."""
    generator = torch.Generator().manual_seed(rank)
    leaves = {name: torch.randn(4, 8, generator=generator, dtype=torch.float64).requires_grad_()
              for name in ("a", "b")}
    loss = ops.multi_infonce(leaves, [("a", "b")], backend="reference", gather="autograd")
    gradients = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
    try:
        sum(g.square().sum() for g in gradients).backward()
    except RuntimeError as error:
        return str(error)
    return None


def _mismatch_errors(rank: int) -> dict:
    """case -> the error each rank raises (None if it raises none) when the ranks disagree on what the gathers
    need: every rank must raise the same ValueError (none may abort, or wait in a collective the others skip).
    Then one agreeing call: the group is still usable (the same loss on both ranks)."""
    generator = torch.Generator().manual_seed(rank)

    def leaves(batch, dtype=torch.float64, names=("a", "b", "c")):
        return {name: torch.randn(batch, 8, generator=generator, dtype=dtype).requires_grad_() for name in names}

    cases = {
        "batch": dict(embeddings=leaves(4 if rank == 0 else 3), pairs=[("a", "b")]),
        "modalities": dict(embeddings=leaves(4), pairs=[("a", "b")] if rank == 0 else [("a", "b"), ("a", "c")]),
        "dtype": dict(embeddings=leaves(4, torch.float64 if rank == 0 else torch.float32), pairs=[("a", "b")]),
        "weights": dict(embeddings=leaves(4), pairs=[("a", "b"), ("b", "c")], weights=[0.5, 0.5 + rank]),
        "requires grad": dict(embeddings={name: x if rank == 0 or name == "a" else x.detach()
                                          for name, x in leaves(4).items()}, pairs=[("a", "b")]),
        "unpaired": dict(embeddings=leaves(4), pairs=[("a", "b")]),  # c, in no pair, on both ranks
    }
    found = {}
    for case, call in cases.items():
        try:
            ops.multi_infonce(call["embeddings"], call["pairs"], weights=call.get("weights"), backend="reference")
            found[case] = None
        except ValueError as error:
            found[case] = str(error)
    found["after"] = ops.multi_infonce(leaves(4, names=("a", "b")), [("a", "b")], backend="reference").detach()
    return found


class _Heads(torch.nn.Module):
    """Two Linear heads and a CLIP-style logit scale: the parameters DDP replicates (the same init everywhere)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(5, 4).double() for name in ("a", "b")})
        with torch.no_grad():
            for parameter in self.heads.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, inputs):
        return {name: head(inputs[name]) for name, head in self.heads.items()}, torch.exp(-self.logit_scale)


def _heads_inputs(world: int, local: int = 6) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {name: torch.randn(world * local, 5, generator=generator, dtype=torch.float64) for name in ("a", "b")}


def _public_molbind_loss(a, b, temperature, rank):
    """MolBind's public ``Model.contrastive`` (model/contrastive.py) for one pair: normalised features gathered
    under no_grad (``pl_concat_all_gather``), F.cross_entropy averaged over the LOCAL rows, labels offset by rank."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    with torch.no_grad():
        gathered = []
        for x in (a, b):
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, x)
            gathered.append(torch.cat(parts))
        a_all, b_all = gathered
    labels = torch.arange(a.shape[0]) + rank * a.shape[0]
    return (F.cross_entropy(a @ b_all.T / temperature, labels) +
            F.cross_entropy(b @ a_all.T / temperature, labels)) / 2


def _ddp_gradients(rank: int, world: int) -> dict:
    """mode -> the parameters' gradients (flattened) after DDP's averaging, for the op's two gathers and the
    public code."""
    inputs = {name: x[rank * 6:(rank + 1) * 6] for name, x in _heads_inputs(world).items()}
    found = {}
    for mode in ("autograd", "no_grad", "public"):
        model = torch.nn.parallel.DistributedDataParallel(_Heads())
        embeddings, temperature = model(inputs)
        if mode == "public":
            loss = _public_molbind_loss(embeddings["a"], embeddings["b"], temperature, rank)
        else:
            loss = ops.multi_infonce(embeddings, [("a", "b")], temperature=temperature, backend="reference",
                                     gather=mode)
        loss.backward()
        found[mode] = torch.cat([p.grad.reshape(-1) for p in model.module.parameters()])
    return found


def _worker(rank: int, world: int, init_file: str, out_dir: str, seed: int) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # inherited already; set before any triton import anyway
    torch.set_num_threads(2)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for name, scenario in _scenarios(seed).items():
            start = time.perf_counter()
            results[name] = _local_run(scenario, rank, world)
            results[name]["seconds"] = time.perf_counter() - start
        results["double backward"] = _double_backward_error(rank)
        results["mismatch"] = _mismatch_errors(rank)
        results["ddp"] = _ddp_gradients(rank, world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results():
    """(seed, scenarios, [rank 0 results, rank 1 results]) from one 2-process gloo run."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed: {seed}")
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "rendezvous")
        context = mp.start_processes(_worker, args=(WORLD, init_file, out_dir, seed), nprocs=WORLD, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + TIMEOUT_S
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                pytest.fail(f"the {WORLD} gloo processes did not finish in {TIMEOUT_S} s (seed {seed})")
        results = [torch.load(os.path.join(out_dir, f"rank{rank}.pt")) for rank in range(WORLD)]
    return seed, _scenarios(seed), results


# --------------------------------------------------------------------------------------------- expectations


def _single_process(scenario: dict) -> dict:
    """The single-process op on the full batch, float64 reference: loss and gradients."""
    leaves = {name: x.clone().requires_grad_() for name, x in scenario["embeddings"].items()}
    temperature = scenario["temperature"]
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.clone().requires_grad_()
    loss = ops.multi_infonce(leaves, scenario["pairs"], weights=scenario["weights"], temperature=temperature,
                             masks=scenario["masks"], normalize=scenario["normalize"], backend="reference")
    loss.backward()
    found = {"loss": loss.detach()}
    found.update({f"d{name}": leaf.grad.detach() for name, leaf in leaves.items()})
    if isinstance(temperature, torch.Tensor):
        found["dtemperature"] = temperature.grad.detach()
    return found


def _public_code(scenario: dict, rank: int, world: int) -> dict:
    """MolBind's public ``contrastive``, written out with F.cross_entropy (float64): rank ``rank``'s local rows
    against CONSTANT gathered copies, labels offset by rank, per pair ``(CE(x Y^T / t) + CE(y X^T / t)) / 2``,
    extended to masks (present samples only) and summed over the local rows over the GLOBAL count (the public
    code averages over the local rows: ``world`` times this for equal counts). Returns the local gradients and
    this rank's temperature gradient."""
    batch = next(iter(scenario["embeddings"].values())).shape[0]
    local = batch // world
    first = rank * local
    leaves = {name: x[first:first + local].clone().requires_grad_() for name, x in scenario["embeddings"].items()}
    temperature = scenario["temperature"].clone().requires_grad_()
    masks = scenario["masks"] or {}
    total = 0.0
    for (a, b), weight in zip(scenario["pairs"], scenario["weights"]):
        present = torch.ones(batch, dtype=torch.bool)
        for name in (a, b):
            if name in masks:
                present &= masks[name]
        everywhere = present.nonzero().squeeze(1)
        mine = everywhere[(everywhere >= first) & (everywhere < first + local)]
        if len(everywhere) == 0:
            continue
        a_all = F.normalize(scenario["embeddings"][a][everywhere], dim=-1)  # gathered under no_grad
        b_all = F.normalize(scenario["embeddings"][b][everywhere], dim=-1)
        x = F.normalize(leaves[a][mine - first], dim=-1)
        y = F.normalize(leaves[b][mine - first], dim=-1)
        labels = torch.searchsorted(everywhere, mine)  # the local samples' columns in the gathered batch
        loss = (F.cross_entropy(x @ b_all.T / temperature, labels, reduction="sum") +
                F.cross_entropy(y @ a_all.T / temperature, labels, reduction="sum")) / 2
        total = total + weight * loss / len(everywhere)
    total.backward()
    found = {f"d{name}": leaf.grad.detach() if leaf.grad is not None else torch.zeros_like(leaf)
             for name, leaf in leaves.items()}
    found["dtemperature"] = temperature.grad.detach()
    return found


def _compare_local(got: dict, expected: dict, rank: int, local: int, masks, label: str) -> None:
    for name, value in got.items():
        if not name.startswith("d") or name == "dtemperature":
            continue
        modality = name[1:]
        ref = expected[name]
        if ref.shape[0] != local:
            ref = ref[rank * local:(rank + 1) * local]
        out = value.double()
        assert torch.isfinite(out).all(), f"{label} rank {rank} {name}: inf or NaN"
        if masks is not None and modality in masks:
            absent = ~masks[modality][rank * local:(rank + 1) * local]
            assert (out[absent] == 0).all(), f"{label} rank {rank} {name}: nonzero gradient at absent samples"
            out, ref = out[~absent], ref[~absent]
        if ref.numel() == 0:
            continue
        if ref.norm() == 0:
            assert out.abs().max() < 10 * RELATIVE_ERROR[torch.float32], f"{label} rank {rank} {name}: expected 0"
            continue
        assert_close(out, ref, torch.float32, f"{label} rank {rank} {name}")


# -------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ["masked-autograd-triton", "masked-autograd-reference", "plain-autograd-triton",
                                  "plain-autograd-reference", "sparse-masks-triton", "sparse-masks-reference",
                                  "sparse-masks-unchecked-triton"])
def test_autograd_gather_matches_single_process(distributed_results, name):
    """Every rank: the global loss, its local embeddings' single-process gradients; the temperature gradients
    summed over the ranks: the single-process one."""
    seed, scenarios, results = distributed_results
    scenario = scenarios[name]
    expected = _single_process(scenario)
    local = next(iter(scenario["embeddings"].values())).shape[0] // WORLD
    for rank in range(WORLD):
        got = results[rank][name]
        assert_close(got["loss"].reshape(1), expected["loss"].reshape(1), torch.float32, f"{name} rank {rank} loss")
        _compare_local(got, expected, rank, local, scenario["masks"], name)
    if "dtemperature" in expected:
        summed = sum(results[rank][name]["dtemperature"].double() for rank in range(WORLD))
        assert_close(summed.reshape(1), expected["dtemperature"].reshape(1), torch.float32,
                     f"{name}: temperature gradient summed over ranks")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_no_grad_gather_is_the_public_codes_gradient(distributed_results, backend):
    """gather="no_grad": the same (global) loss, but the gradient of the public code's local rows only: checked
    against the hand-written expectation, and shown to differ from the single-process gradient."""
    seed, scenarios, results = distributed_results
    name = f"masked-no_grad-{backend}"
    scenario = scenarios[name]
    expected = _single_process(scenario)
    local = next(iter(scenario["embeddings"].values())).shape[0] // WORLD
    summed_temperature = 0.0
    for rank in range(WORLD):
        got = results[rank][name]
        assert_close(got["loss"].reshape(1), expected["loss"].reshape(1), torch.float32, f"{name} rank {rank} loss")
        public = _public_code(scenario, rank, WORLD)
        _compare_local(got, public, rank, local, scenario["masks"], name)
        assert_close(got["dtemperature"].reshape(1), public["dtemperature"].reshape(1), torch.float32,
                     f"{name} rank {rank} temperature gradient")
        summed_temperature = summed_temperature + got["dtemperature"].double()
        # Biased: the embedding gradients are not the single-process ones.
        full = expected["dtext"][rank * local:(rank + 1) * local]
        gap = (got["dtext"].double() - full).norm() / full.norm()
        assert gap > 0.1, f"{name} rank {rank}: the no-grad gradient should differ from the full one ({gap:.2e})"
    # The temperature enters only through the local rows, so its summed gradient is still the full one.
    assert_close(summed_temperature.reshape(1), expected["dtemperature"].reshape(1), torch.float32,
                 f"{name}: temperature gradient summed over ranks")


def test_gather_none_is_each_ranks_own_batch(distributed_results):
    seed, scenarios, results = distributed_results
    scenario = scenarios["masked-none-triton"]
    batch = next(iter(scenario["embeddings"].values())).shape[0]
    local = batch // WORLD
    for rank in range(WORLD):
        rows = slice(rank * local, (rank + 1) * local)
        half = dict(scenario, embeddings={n: x[rows] for n, x in scenario["embeddings"].items()},
                    masks={n: m[rows] for n, m in scenario["masks"].items()})
        expected = _single_process(half)
        got = results[rank]["masked-none-triton"]
        assert_close(got["loss"].reshape(1), expected["loss"].reshape(1), torch.float32, f"rank {rank} loss")
        _compare_local(got, expected, 0, local, half["masks"], "gather=None")
        assert_close(got["dtemperature"].reshape(1), expected["dtemperature"].reshape(1), torch.float32,
                     f"rank {rank} temperature gradient")


def test_double_backward_through_the_gather_refuses(distributed_results):
    for rank, results in enumerate(distributed_results[2]):
        message = results["double backward"]
        assert message is not None and "once_differentiable" in message, f"rank {rank}: {message}"


@pytest.mark.parametrize("case, expected", [
    ("batch", "the same local batch size B (rank 0: 4, rank 1: 3)"),
    ("modalities", "the same modalities used by the pairs (ranks that agree: [0], [1]; this rank, {rank}, has "),
    ("dtype", "the same dtype (rank 0: torch.float64, rank 1: torch.float32)"),
    ("weights", "the same pairs, weights, normalize and a float temperature (ranks that agree: [0], [1]"),
    ("requires grad", "the same modalities requiring a gradient (ranks that agree: [0], [1]; this rank, {rank}, "
                      "has "),
])
def test_ranks_that_disagree_all_raise(distributed_results, case, expected):
    """A local batch size, modality, dtype, weight or requires_grad that differs between the ranks: a ValueError
    on every rank naming it (it used to abort gloo, or hang NCCL), and the group still works afterwards."""
    results = distributed_results[2]
    for rank in range(WORLD):
        message = results[rank]["mismatch"][case]
        assert message is not None and message.startswith("multi_infonce across ranks: every rank of process_group "
                                                          "must pass "), f"rank {rank}: {message}"
        assert expected.format(rank=rank) in message, f"rank {rank}: {message}"
    torch.testing.assert_close(results[0]["mismatch"]["after"], results[1]["mismatch"]["after"])


def test_a_modality_in_no_pair_is_refused_on_every_rank(distributed_results):
    """Refused after the ranks compare headers (which carry the unpaired names), so that all of them raise."""
    for rank in range(WORLD):
        message = distributed_results[2][rank]["mismatch"]["unpaired"]
        assert message is not None and message.startswith("embeddings: modality 'c' is in no pair"), message


def test_ddp_scale(distributed_results):
    """Under DDP (which averages the ranks' gradients), the loss times the world size gives the parameters the
    single-process gradient with gather="autograd", and the public MolBind code's with gather="no_grad"."""
    results = distributed_results[2]
    for mode in ("autograd", "no_grad", "public"):
        torch.testing.assert_close(results[0]["ddp"][mode], results[1]["ddp"][mode])  # DDP: one gradient
    model = _Heads()
    embeddings, temperature = model(_heads_inputs(WORLD))
    ops.multi_infonce(embeddings, [("a", "b")], temperature=temperature, backend="reference").backward()
    single = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    got = results[0]["ddp"]
    torch.testing.assert_close(got["autograd"] * WORLD, single)
    torch.testing.assert_close(got["no_grad"] * WORLD, got["public"])
    assert (got["public"] - single).norm() > 0.1 * single.norm()  # the public code's gradient is another one


def test_report_timings(distributed_results):
    """Not a check: prints each scenario's time per rank (interpreter), to keep the file under a minute."""
    seed, scenarios, results = distributed_results
    for name in scenarios:
        print(name, " ".join(f"{results[rank][name]['seconds']:.2f}s" for rank in range(WORLD)))


def test_gather_option_is_validated():
    a = torch.randn(4, 8)
    with pytest.raises(ValueError, match="gather: expected 'autograd', 'no_grad' or None"):
        ops.multi_infonce({"a": a, "b": a.clone()}, [("a", "b")], gather="all")
