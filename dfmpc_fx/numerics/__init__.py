"""Layer 1, pure math: quantizers, closed forms, moments arithmetic, bit packing.

Plain tensor functions: no torch.fx, no modules, no Lightning. Imports torch and
:mod:`dfmpc_fx.errors` only.
"""
