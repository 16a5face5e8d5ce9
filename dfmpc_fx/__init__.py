"""dfmpc-fx: data-free mixed-precision compensation (DF-MPC) for PyTorch models, via torch.fx.

    import dfmpc_fx
    qmodel = dfmpc_fx.compress(model, dfmpc_fx.DFMPCConfig(low_bits=2, high_bits=6))
"""
from __future__ import annotations

from .config import DFMPCConfig
from .errors import ConfigError, DFMPCError, InvalidModelError, TraceError
from .artifacts.export import ExportError, export_as, export_onnx, export_program, export_torchscript
from .transform.modules import QuantConv1d, QuantConv2d, QuantLinear
from .artifacts.packed import PackedConv1d, PackedConv2d, PackedLinear, PackError, pack_model, unpack_model
from .graph.pairs import CompensablePair, PairSearch, Refusal, find_compensable_pairs
from .numerics.quant import QuantizedWeight, fake_quantize_weight
from .transform.report import CompressionReport, LayerReport, get_report
from .artifacts.serialization import SerializationError, load, save
from .transform.compress import DefaultBudgetWarning, NoCompensablePairWarning, compress, swap_compressed_modules

from ._version import __version__

__all__ = [
    "DFMPCConfig",
    "compress",
    "find_compensable_pairs",
    "get_report",
    "export_torchscript",
    "export_program",
    "export_onnx",
    "export_as",
    "pack_model",
    "unpack_model",
    "save",
    "load",
    "PackedConv1d",
    "PackedConv2d",
    "PackedLinear",
    "PackError",
    "SerializationError",
    "swap_compressed_modules",
    "CompensablePair",
    "Refusal",
    "PairSearch",
    "CompressionReport",
    "LayerReport",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantizedWeight",
    "fake_quantize_weight",
    "DFMPCError",
    "ConfigError",
    "TraceError",
    "InvalidModelError",
    "ExportError",
    "NoCompensablePairWarning",
    "DefaultBudgetWarning",
    "__version__",
]
