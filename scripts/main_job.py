"""The main job: ResNet-20 on Fashion-MNIST with Lightning, compressed by DFMPCCallback at MP2/6.

    .venv/bin/python scripts/main_job.py                 # defaults below, about 2-4 min on 1 core
    .venv/bin/python scripts/main_job.py --finetune-batches 0     # no training: compress before test
    .venv/bin/python scripts/main_job.py --from-scratch --epochs 2

1. Starts from the committed ``checkpoints/resnet20.pt`` (trained by ``recipes/train.py``) and
   fine-tunes it briefly with a ``lightning.Trainer`` (``--finetune-batches``, small LR), or,
   with ``--from-scratch`` or without that checkpoint, trains it for ``--epochs`` epochs.
2. ``DFMPCCallback(DFMPCConfig(low_bits=2, high_bits=6), module_attr="net")`` runs after training: it
   evaluates ``val_acc`` (the 10k Fashion-MNIST test images) before and after compressing, swaps
   the compressed layers into the LightningModule, and logs everything to the run of the
   Trainer's ``MLFlowLogger``: the embedded store ``sqlite:///<repo>/mlflow.db`` by default.
3. The TorchScript file goes to ``outputs/resnet20_mp2-6.ts``; it is reloaded with plain
   ``torch.jit.load`` and its accuracy measured on the test set.
4. Prints a before/after table and how to open the MLflow UI on the store.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(REPO))

os.environ.setdefault("OMP_NUM_THREADS", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "resnet20.pt",
                   help="float ResNet-20 state dict to start from (default: checkpoints/resnet20.pt)")
    p.add_argument("--from-scratch", action="store_true", help="ignore the checkpoint and train from scratch")
    p.add_argument("--epochs", type=int, default=1, help="epochs when training from scratch (default 1)")
    p.add_argument("--finetune-batches", type=int, default=50,
                   help="batches of fine-tuning from the checkpoint (default 50; 0: no training, "
                        "compress right before trainer.test)")
    p.add_argument("--finetune-lr", type=float, default=0.005, help="peak learning rate of the fine-tune")
    p.add_argument("--low-bits", type=int, default=2)
    p.add_argument("--high-bits", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit-val-batches", type=float, default=1.0,
                   help="fraction or number of 1000-image validation batches (default: all 10)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store or server (default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db)")
    p.add_argument("--experiment", default="dfmpc-main-job", help="MLflow experiment name")
    p.add_argument("--out", type=Path, default=REPO / "outputs", help="where the TorchScript file and summary go")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    console.print("[bold]dfmpc-fx main job[/]: ResNet-20 / Fashion-MNIST, Lightning + DFMPCCallback "
                  f"MP{args.low_bits}/{args.high_bits}, MLflow")
    t_start = time.perf_counter()

    import lightning as L
    import torch
    from lightning.pytorch.loggers import MLFlowLogger

    import dfmpc_fx
    from dfmpc_fx.integrations import tracking
    from dfmpc_fx.callbacks import DFMPCCallback, ExportSpec, TrackingSpec
    from dfmpc_fx.examples.data import load_fashion_mnist
    from dfmpc_fx.examples.training import FashionMNISTDataModule, LitClassifier, evaluate_accuracy
    from dfmpc_fx.examples.zoo import build_model

    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, workers=True)

    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_tracking_uri(REPO)
    tracking_uri = tracking.resolve_tracking_uri(tracking_uri)
    args.out.mkdir(parents=True, exist_ok=True)
    ts_path = args.out / f"resnet20_mp{args.low_bits}-{args.high_bits}.ts"

    # ---- the network: committed checkpoint (+ short fine-tune) or training from scratch
    net = build_model("resnet20")
    from_checkpoint = not args.from_scratch and args.checkpoint.is_file()
    if from_checkpoint:
        net.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
        source = f"{args.checkpoint.relative_to(REPO) if args.checkpoint.is_relative_to(REPO) else args.checkpoint}"
        train_note = (f"fine-tune {args.finetune_batches} batches, peak lr {args.finetune_lr}"
                      if args.finetune_batches > 0 else "no training (compressed before trainer.test)")
        max_lr = args.finetune_lr
    else:
        if not args.from_scratch:
            console.print(f"[yellow]{args.checkpoint} not found: training ResNet-20 from scratch "
                          f"for {args.epochs} epoch(s) (a few minutes per epoch on one core)[/]")
        source = "random init"
        train_note = f"{args.epochs} epoch(s) from scratch, one-cycle peak lr 0.2"
        max_lr = 0.2
    console.print(f"network: resnet20 from {source}; training: {train_note}")

    module = LitClassifier(net, model_name="resnet20", max_lr=max_lr)
    data = FashionMNISTDataModule(batch_size=args.batch_size, val_split="test", seed=args.seed)
    logger = MLFlowLogger(
        experiment_name=args.experiment,
        tracking_uri=tracking_uri,
        run_name=f"resnet20-mp{args.low_bits}-{args.high_bits}",
        tags={"dfmpc.job": "main_job", "dfmpc.source": source},
        # artifacts next to the sqlite file (an absolute path, whatever the working directory)
        artifact_location=str(Path(tracking_uri[len("sqlite:///"):]).parent / "mlruns")
        if tracking_uri.startswith("sqlite:///") else None,
    )
    no_training = from_checkpoint and args.finetune_batches <= 0
    test_x, test_y = load_fashion_mnist("test")
    eval_fn = None
    if no_training:
        def eval_fn(pl_module):  # the test set, as the fit-time validation would see it
            return {"val_acc": evaluate_accuracy(pl_module.net, test_x, test_y)}

    callback = DFMPCCallback(
        dfmpc_fx.DFMPCConfig(low_bits=args.low_bits, high_bits=args.high_bits),
        module_attr="net",
        apply_on="test" if no_training else "fit",
        eval_fn=eval_fn,
        export=ExportSpec(example_input=test_x[:1].clone(), torchscript_path=ts_path),
        tracking=TrackingSpec(tags={"dfmpc.job": "main_job"}),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1 if from_checkpoint else args.epochs,
        limit_train_batches=args.finetune_batches if from_checkpoint and not no_training else 1.0,
        limit_val_batches=args.limit_val_batches,
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        deterministic=True,
    )
    t_train = time.perf_counter()
    if no_training:
        trainer.test(module, datamodule=data, verbose=False)
    else:
        trainer.fit(module, datamodule=data)
    train_seconds = time.perf_counter() - t_train

    # ---- the exported file, loaded without dfmpc_fx, on the whole test set
    ts_acc = None
    if ts_path.is_file():
        scripted = torch.jit.load(str(ts_path))
        ts_acc = evaluate_accuracy(scripted, test_x, test_y)
    report = callback.report
    m = callback.metrics

    def pct(key: str) -> str:  # LitClassifier and evaluate_accuracy report percent
        value = m.get(key)
        return "-" if value is None else f"{value:.2f} %"

    table = Table(title="ResNet-20 on Fashion-MNIST: before / after DF-MPC")
    table.add_column("")
    table.add_column("fp32", justify="right")
    table.add_column(f"DF-MPC MP{args.low_bits}/{args.high_bits}", justify="right")
    table.add_row("val_acc (Fashion-MNIST test set)", pct("fp32/val_acc"), pct("dfmpc/val_acc"))
    if "fp32/val_loss" in m:
        table.add_row("val_loss", f"{m['fp32/val_loss']:.4f}", f"{m['dfmpc/val_loss']:.4f}")
    table.add_row("weights size", f"{report.float_bytes / 1e6:.3f} MB", f"{report.compressed_bytes / 1e6:.3f} MB")
    table.add_row("compression ratio", "x1.00", f"x{report.compression_ratio:.2f}")
    table.add_row("TorchScript file, torch.jit.load, test acc", "", f"{ts_acc:.2f} %" if ts_acc is not None else "-")
    console.print(table)
    bits = {}
    for layer in report.layers:
        bits[str(layer.bits) if layer.bits is not None else "float"] = bits.get(
            str(layer.bits) if layer.bits is not None else "float", 0) + 1
    console.print(f"{report.num_pairs} compensable pairs; layers per bit width: "
                  + ", ".join(f"{b} bits: {n}" for b, n in sorted(bits.items())) +
                  f"; compress time {report.compress_seconds:.2f} s; training {train_seconds:.0f} s")

    summary = {
        "model": "resnet20",
        "source": source,
        "training": train_note,
        "low_bits": args.low_bits,
        "high_bits": args.high_bits,
        "metrics": m,
        "torchscript_path": str(ts_path),
        "torchscript_test_acc": ts_acc,
        "tracking_uri": tracking_uri,
        "experiment": args.experiment,
        "run_id": callback.run_id,
        "model_uri": callback.model_uri,
        "local_fallback": str(callback.local_path) if callback.local_path else None,
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    (args.out / "main_job_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    console.print(f"TorchScript: {ts_path}  (torch.jit.load works without dfmpc_fx)")
    if callback.run_id and not callback.tracking_error:
        console.print(f"MLflow run {callback.run_id} in experiment '{args.experiment}' at {tracking_uri}")
        if callback.model_uri:
            console.print(f"  load the model back: mlflow.pytorch.load_model('{callback.model_uri}') "
                          f"or 'runs:/{callback.run_id}/model' (with mlflow.set_tracking_uri('{tracking_uri}'))")
    if callback.local_path:
        console.print(f"[yellow]MLflow was not reachable; everything was saved to {callback.local_path}[/]")
    if tracking_uri.startswith("sqlite:"):
        console.print("Open the MLflow UI on this store:\n"
                      f"  .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --port 5000\n"
                      "  then browse http://127.0.0.1:5000 (experiment "
                      f"'{args.experiment}'; Artifacts tab: dfmpc/report.md, layers.png, model.ts)")
    else:
        console.print(f"MLflow UI: {tracking_uri}")
    console.print(f"done in {summary['seconds_total']:.0f} s; summary in {args.out / 'main_job_summary.json'}")
    return summary


if __name__ == "__main__":
    main()
