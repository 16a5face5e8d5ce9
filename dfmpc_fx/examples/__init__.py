"""Example models, Fashion-MNIST loading and Lightning training helpers used by the recipes,
benchmarks and tests. Not part of the library: no layer imports this package."""
