"""Whole models built on pyblend's layers."""
from .moleblend import (
    MoleBlend,
    MoleBlendConfig,
    MoleBlendPredictor,
    convert_transformer_m_state_dict,
)

__all__ = ["MoleBlend", "MoleBlendConfig", "MoleBlendPredictor", "convert_transformer_m_state_dict"]
