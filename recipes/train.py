"""Train one zoo model on Fashion-MNIST with a lightning.Trainer (CPU, or one GPU) and write
``<out>/<name>.pt`` (bare ``net`` state dict, float32) and ``<out>/<name>.json``.

    OMP_NUM_THREADS=1 python recipes/train.py --model resnet20 --epochs 4

The test accuracy in the JSON is computed after training by
``dfmpc_fx.examples.training.evaluate_accuracy`` on the full 10k test set, from the saved weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow running from a checkout without installing
    sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from dfmpc_fx.examples.data import load_fashion_mnist  # noqa: E402
from dfmpc_fx.examples.training import FashionMNISTDataModule, LitClassifier, evaluate_accuracy  # noqa: E402
from dfmpc_fx.examples.zoo import MODELS, build_model  # noqa: E402


class ProgressPrinter(L.Callback):
    """Prints a plain progress line every ``every`` steps (log-file friendly)."""

    def __init__(self, every: int = 50) -> None:
        self.every = every
        self.start = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        if batch_idx % self.every == 0:
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            print(
                f"epoch {trainer.current_epoch} step {batch_idx}/{trainer.num_training_batches} "
                f"loss {loss:.4f} elapsed {time.time() - self.start:.0f}s",
                flush=True,
            )

    def on_validation_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        m = trainer.callback_metrics
        if "val_acc" in m:
            print(
                f"epoch {trainer.current_epoch} val_acc {float(m['val_acc']):.2f} "
                f"val_loss {float(m['val_loss']):.4f} elapsed {time.time() - self.start:.0f}s",
                flush=True,
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-lr", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"),
                   help="lightning accelerator (default cpu; gpu trains on one CUDA device)")
    p.add_argument("--out", type=Path, default=REPO / "checkpoints")
    p.add_argument("--log-dir", type=Path, default=Path("/tmp/dfmpc_train_logs"))
    p.add_argument("--limit-train-batches", type=float, default=1.0, help="for smoke runs only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.accelerator == "gpu":
        # deterministic=True needs a fixed cuBLAS workspace on CUDA.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    omp = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={omp} " if omp else "") + "python recipes/train.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    L.seed_everything(args.seed, workers=True)

    net = build_model(args.model)
    n_params = sum(p.numel() for p in net.parameters())
    module = LitClassifier(net, model_name=args.model, max_lr=args.max_lr)
    data = FashionMNISTDataModule(batch_size=args.batch_size, num_workers=0, val_split="test", seed=args.seed)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_epochs=args.epochs,
        logger=CSVLogger(str(args.log_dir), name=args.model),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        log_every_n_steps=50,
        limit_train_batches=args.limit_train_batches,
        callbacks=[ProgressPrinter()],
    )
    print(f"training {args.model} ({n_params} parameters) for {args.epochs} epochs: {command}", flush=True)
    start = time.time()
    trainer.fit(module, datamodule=data)
    train_seconds = time.time() - start

    state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
             for k, v in module.net.state_dict().items()}
    args.out.mkdir(parents=True, exist_ok=True)
    pt_path = args.out / f"{args.model}.pt"
    torch.save(state, pt_path)

    # Evaluate the saved weights, reloaded into a fresh model, exactly as users will.
    fresh = build_model(args.model)
    fresh.load_state_dict(torch.load(pt_path, map_location="cpu", weights_only=True))
    test_x, test_y = load_fashion_mnist("test")
    test_acc = evaluate_accuracy(fresh, test_x, test_y)
    first_1000 = evaluate_accuracy(fresh, test_x[:1000], test_y[:1000])

    record = {
        "model": args.model,
        "parameters": n_params,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "max_lr": args.max_lr,
        "seed": args.seed,
        "dataset": "fashion-mnist (Debian dataset-fashion-mnist), 60k train / 10k test",
        "test_acc": round(test_acc, 2),
        "test_acc_first_1000": round(first_1000, 2),
        "train_seconds": round(train_seconds, 1),
        "threads": args.threads,
        "accelerator": args.accelerator,
        "device": torch.cuda.get_device_name(0) if args.accelerator == "gpu" else platform.processor() or "cpu",
        "torch_version": torch.__version__,
        "lightning_version": L.__version__,
        "python_version": platform.python_version(),
        "checkpoint_bytes": pt_path.stat().st_size,
        "command": command,
    }
    (args.out / f"{args.model}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2), flush=True)
    return record


if __name__ == "__main__":
    main()
