"""DDP job for test_ddp.py: ``python ddp_job.py --uri URI --experiment NAME --out DIR``.

Lightning's subprocess launcher re-runs this script for rank 1. Each rank writes
``DIR/rank<r>.json`` with a digest of its compressed network and what the callback saw.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import MLFlowLogger  # noqa: E402
from tinymodels import TinyLit, make_loader, state_digest  # noqa: E402

import dfmpc_fx  # noqa: E402
from dfmpc_fx.callbacks import DFMPCCallback, TrackingSpec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, workers=True)
    model = TinyLit(sync_dist=True)
    logger = MLFlowLogger(experiment_name=args.experiment, tracking_uri=args.uri)
    cb = DFMPCCallback(module_attr="net", tracking=TrackingSpec(local_dir=str(Path(args.out) / "dfmpc_runs")))
    trainer = L.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, logger=logger, callbacks=[cb],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=args.out,
    )
    trainer.fit(model, make_loader(128), make_loader(64, seed=1))
    rank = trainer.global_rank
    record = {
        "rank": rank,
        "world_size": trainer.world_size,
        "digest": state_digest(model.net),
        "callback_digest": cb.weights_digest,
        "quant_modules": sorted(
            n for n, m in model.net.named_modules() if isinstance(m, (dfmpc_fx.QuantConv2d, dfmpc_fx.QuantLinear))
        ),
        "run_id": cb.run_id,
        "local_path": str(cb.local_path) if cb.local_path else None,
        "metrics": cb.metrics,
        "pid": os.getpid(),
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
