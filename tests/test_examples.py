"""The examples import, parse their options, and share a correct scaffold split and multi-task ROC-AUC."""
import importlib

import numpy as np
import pytest

from pyblend.examples.moleculenet import mean_roc_auc, scaffold_split


@pytest.mark.parametrize("name", ["dynamic_fusion", "mm_lego", "molbind_alignment", "moleblend_pretrain"])
def test_example_imports_and_shows_its_options(name, capsys):
    module = importlib.import_module(f"pyblend.examples.{name}")
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("name, arguments, words", [
    ("molbind_alignment", ["--held-out", "-5"], "argument --held-out: expected a positive int, got -5"),
    ("molbind_alignment", ["--molecules", "20", "--held-out", "50"], "--held-out: expected fewer than --molecules"),
    ("molbind_alignment", ["--minutes", "-1"], "argument --minutes: expected a positive float, got -1"),
    ("molbind_alignment", ["--batch", "0"], "argument --batch: expected a positive int, got 0"),
    ("moleblend_pretrain", ["--seeds", "0"], "argument --seeds: expected a positive int, got 0"),
    ("moleblend_pretrain", ["--data", "/nonexistent"], "--data: bbbp.csv not found in /nonexistent"),
    ("mm_lego", ["--epochs", "-2"], "argument --epochs: expected a positive int, got -2"),
    ("mm_lego", ["--data", "/nonexistent", "--task", "bace"], "--data: bace.csv not found"),
    ("dynamic_fusion", ["--missing", "1.5"], "argument --missing: expected a float in [0, 1), got 1.5"),
    ("dynamic_fusion", ["--epochs", "0"], "argument --epochs: expected a positive int, got 0"),
    ("dynamic_fusion", ["--tasks", "bbbp,bbbp"], "--tasks: expected distinct names among bbbp, bace"),
    ("dynamic_fusion", ["--tasks", "foo"], "--tasks: expected distinct names"),
    ("dynamic_fusion", ["--seeds", "x"], "argument --seeds: invalid positive int value: 'x'"),
])
def test_example_refuses_bad_options_before_any_work(name, arguments, words, capsys):
    """Found by a bad-input sweep: a negative --held-out swapped the split, --minutes -1 printed an 'aligned' row
    after 0 steps, --missing 1.5 printed '150% missing', --epochs 0 a table of NaN, a repeated task pooled its
    runs, and a missing --data folder failed after pretraining; others crashed without naming the flag."""
    module = importlib.import_module(f"pyblend.examples.{name}")
    with pytest.raises(SystemExit) as stop:
        module.main(arguments)
    assert stop.value.code == 2
    assert words in capsys.readouterr().err


def test_scaffold_split_keeps_scaffolds_together_and_covers_every_molecule():
    from rdkit.Chem.Scaffolds import MurckoScaffold

    smiles = ["c1ccccc1C", "c1ccccc1CC", "c1ccccc1O", "C1CCCCC1N", "C1CCCCC1O", "CCO", "CCN", "c1ccncc1C",
              "O=C1CCCN1", "c1ccc2ccccc2c1", "c1ccc2ccccc2c1C", "C1CC1C"] * 3
    split = scaffold_split(smiles)
    rows = np.concatenate([split["train"], split["valid"], split["test"]])
    assert sorted(rows.tolist()) == list(range(len(smiles)))
    assert len(split["train"]) <= 0.8 * len(smiles)
    part = {int(i): name for name, indices in split.items() for i in indices}
    scaffold = [MurckoScaffold.MurckoScaffoldSmiles(smiles=s, includeChirality=False) for s in smiles]
    for i in range(len(smiles)):
        for j in range(len(smiles)):
            if scaffold[i] == scaffold[j]:
                assert part[i] == part[j], (smiles[i], smiles[j])


def test_scaffold_split_follows_deepchems_valid_cutoff_and_names_bad_smiles():
    """DeepChem's ScaffoldSplitter gives a group to valid while train + valid stay within 90%: the slack train
    leaves below 80% goes to valid (the split capped valid alone at 10%, and BBBP came out 1631/203/205, not
    DeepChem's 1631/204/204)."""
    # 10 molecules: scaffold groups of 7, 2 and 1. The 7 go to train; the 2 cannot join train (9 > 8) and go to
    # valid (7 + 2 <= 9), where a 10% cap on valid alone (2 > 1) sent them to test; the last one fits in train.
    smiles = ["c1ccccc1" + tail for tail in ("C", "CC", "O", "N", "F", "Cl", "Br")] + ["C1CCCCC1C", "C1CCCCC1O",
                                                                                     "CCO"]
    split = scaffold_split(smiles)
    assert {name: rows.tolist() for name, rows in split.items()} == {"train": [*range(7), 9], "valid": [7, 8],
                                                                      "test": []}
    # Empty parts are int64 (a float64 empty array is no index), and an unparsable SMILES is named.
    empty = scaffold_split(["CCO"] * 3)
    assert all(rows.dtype == np.int64 for rows in empty.values()) and empty["valid"].size == 0
    with pytest.raises(ValueError, match=r"smiles\[1\] = 'not_a_smiles' does not parse"):
        scaffold_split(["CCO", "not_a_smiles"])


def test_mean_roc_auc_skips_missing_labels_and_single_class_tasks():
    scores = np.array([[0.9, 0.1, 0.3], [0.8, 0.2, 0.4], [0.2, 0.7, 0.5], [0.1, 0.6, 0.6]])
    labels = np.array([[1, np.nan, 1], [1, 0, 1], [0, 1, 1], [np.nan, 1, 1]], dtype=float)
    # Task 0: positives 0.9, 0.8 above the negative 0.2 -> 1. Task 1: positives 0.7, 0.6 above 0.2 -> 1.
    # Task 2 has one class only and is skipped.
    assert mean_roc_auc(scores, labels) == 1.0
    labels[:, 1] = [np.nan, 1, 0, 0]  # the positive (0.2) below both negatives -> 0
    assert mean_roc_auc(scores, labels) == 0.5
    assert np.isnan(mean_roc_auc(scores, np.ones_like(labels)))


def test_moleblend_held_out_losses_draw_nothing_from_torchs_generator():
    """The example's before/after losses are fixed by their own generator: with every dropout and drop-path at
    0.5, two evaluations under different torch seeds agree."""
    import torch

    from pyblend import featurize_many
    from pyblend.examples.moleblend_pretrain import batches, held_out_losses
    from pyblend.models import MoleBlend, MoleBlendConfig

    pytest.importorskip("rdkit")
    graphs, _ = featurize_many(["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "C1CC1C(=O)O"], conformer=True,
                               progress=False)
    torch.manual_seed(0)
    model = MoleBlend(MoleBlendConfig(layers=2, dim=32, heads=4, ffn_dim=32, num_kernels=8, head_width=4,
                                      max_distance=8, dropout=0.5, attention_dropout=0.5, activation_dropout=0.5,
                                      droppath=0.5))
    held_out = batches(graphs, 2)
    torch.manual_seed(1)
    first = held_out_losses(model, held_out)
    torch.manual_seed(2)
    assert held_out_losses(model, held_out) == first
    assert model.blender.training and not model.layers[1].training


def test_moleblend_held_out_losses_weigh_each_batch_by_its_molecules(monkeypatch):
    """The held-out losses averaged batch means unweighted: with batches of 64 and 36 molecules the partial one
    counted for half."""
    from types import SimpleNamespace

    import torch

    from pyblend.examples import moleblend_pretrain

    class Constant:
        blender = torch.nn.Module()

        def eval(self):
            return self

        def pretrain_loss(self, batch, generator=None):
            value = torch.tensor(batch.value)
            return value, {name: value for name in moleblend_pretrain.PARTS}

    held_out = [SimpleNamespace(num_atoms=torch.ones(64), value=1.0), SimpleNamespace(num_atoms=torch.ones(36),
                                                                                         value=2.0)]
    totals = moleblend_pretrain.held_out_losses(Constant(), held_out)
    assert totals["total"] == pytest.approx((64 * 1.0 + 36 * 2.0) / 100)


def test_default_set_with_conformers_leaves_out_repeated_molecules(monkeypatch, capsys):
    """The default set repeats molecules (106 repeats among 4999 SMILES): a repeat sat on both sides of the
    examples' held-out splits. Repeats are found by canonical SMILES."""
    pytest.importorskip("rdkit")
    from pyblend import chem
    from pyblend.examples import moleculenet

    monkeypatch.setattr(chem, "default_molecules", lambda count: ["CCO", "OCC", "c1ccccc1", "C(C)O"][:count])
    graphs = moleculenet.default_set_with_conformers(4, seed=0)
    assert [g.smiles for g in graphs] == ["CCO", "c1ccccc1"]
    assert "2 repeats left out" in capsys.readouterr().out
