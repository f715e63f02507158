"""Drop-in ``nn.Module`` layers built on :mod:`pyblend.ops`."""
from .relation_attention import RelationBiasedAttention, bias_from_relations, convert_unimol_state_dict

__all__ = ["RelationBiasedAttention", "bias_from_relations", "convert_unimol_state_dict"]
