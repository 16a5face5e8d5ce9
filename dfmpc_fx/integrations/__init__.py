"""Layer 5, integrations: the Lightning callback, MLflow tracking, the ``dfmpc`` command.

Each needs its extra (``dfmpc-fx[lightning]``, ``[mlflow]``); nothing below imports them.
"""
