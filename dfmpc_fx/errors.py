"""Typed errors: every failure a user can cause says what to do next."""
from __future__ import annotations


class DFMPCError(Exception):
    """Base class of every error raised by dfmpc_fx."""


class ConfigError(DFMPCError, ValueError):
    """An invalid :class:`~dfmpc_fx.DFMPCConfig` value or argument."""


class TraceError(DFMPCError, RuntimeError):
    """torch.fx could not trace the model.

    The message names the offending code and the two remedies: ``concrete_args`` for
    data-dependent control flow on arguments, and ``leaf_modules`` for submodules that should be
    kept opaque.
    """


class InvalidModelError(DFMPCError, ValueError):
    """The model cannot be compressed as given (NaN/Inf weights, no weights at all, ...)."""


class PackError(DFMPCError, ValueError):
    """A layer cannot be packed exactly (its weight is not on its quantization grid, or its
    codes do not fit the bit width)."""


class CompressedModelError(DFMPCError, RuntimeError):
    """The compressed model failed to run on the ``example_inputs`` given to ``compress``; the
    message carries the original error. Report it with the model: the input model ran, so this
    is a dfmpc_fx bug or a layer it does not handle (declare it in ``leaf_modules`` or
    ``skip_layers``)."""
