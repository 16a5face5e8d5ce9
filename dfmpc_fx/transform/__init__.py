"""Layer 3, the transform: ``compress`` (plan per layer, then apply once), the ``Quant*``
modules it emits, and the report it stores on the result."""
