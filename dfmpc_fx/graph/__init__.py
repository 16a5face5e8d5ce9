"""Layer 2, graph analysis: tracing, compensable pairs, bit roles, data-free moments.

Reads torch.fx graphs and decides; every number comes from :mod:`dfmpc_fx.numerics`. Never
edits a module or a tensor.
"""
