"""Lightning integration of dfmpc_fx, installed as ``dfmpc_fx.callbacks``.

.. code-block:: python

    from dfmpc_fx.callbacks import DFMPCCallback
"""

from ..integrations.lightning import (
    CHECKPOINT_KEY,
    DFMPCCallback,
    ExportSpec,
    TrackingSpec,
    load_compressed_checkpoint,
    restore_compressed,
)

__all__ = ["CHECKPOINT_KEY", "DFMPCCallback", "ExportSpec", "TrackingSpec", "load_compressed_checkpoint", "restore_compressed"]
