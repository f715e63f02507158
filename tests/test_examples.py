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
