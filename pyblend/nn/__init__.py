"""Drop-in ``nn.Module`` layers built on :mod:`pyblend.ops`."""
from .contrastive import MultiPairContrastive
from .dynamic_fusion import DynamicFusion
from .gaussian_basis_bias import GaussianBasisBias
from .lego import LegoBlock, LegoFuse, LegoMerge, lego_merge
from .relation_blender import RelationBlender
from .relation_attention import RelationBiasedAttention, bias_from_relations, convert_unimol_state_dict

__all__ = ["DynamicFusion", "GaussianBasisBias", "LegoBlock", "LegoFuse", "LegoMerge", "MultiPairContrastive",
           "RelationBiasedAttention", "RelationBlender", "bias_from_relations", "convert_unimol_state_dict",
           "lego_merge"]
