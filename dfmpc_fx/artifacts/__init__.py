"""Layer 4, artifacts built from a compressed model: packed low-bit modules, TorchScript /
torch.export / ONNX files, and ``save``/``load``."""
