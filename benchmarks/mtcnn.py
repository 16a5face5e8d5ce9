"""MTCNN face detection (facenet-pytorch, PReLU, no BatchNorm) under a size budget.

    python benchmarks/mtcnn.py            # budgets 8 / 4 / 3 bits per weight

Needs ``pip install --no-deps facenet-pytorch`` (it pins an old torch) and ``scikit-image``
(real photos in ``skimage.data``; nothing is downloaded). Each of MTCNN's three networks (P-,
R-, O-Net) is compressed on its own with ``compress(net, target_bits=b, output="module")`` and
put back into the detector. Images, all built offline: the astronaut photo (one face), its
mirror image, a half-size copy, a collage of two face crops pasted on the coffee photo, and
three photos without a face (coffee, chelsea the cat, rocket). A face is *kept* when a
compressed detection has IoU >= 0.7 with it; *extra* counts compressed detections (p >= 0.9)
with no FP32 detection.
"""
from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import numpy as np
import torch

PROB = 0.9  # detections below this probability are ignored on both sides
IOU_KEPT = 0.7


def face_images() -> dict[str, np.ndarray]:
    """RGB uint8 images (H, W, 3), built from ``skimage.data`` without any download."""
    import skimage.data as sd
    from skimage.transform import rescale

    astronaut = sd.astronaut()
    coffee = sd.coffee()
    half = (rescale(astronaut, 0.5, channel_axis=2, anti_aliasing=True) * 255).astype(np.uint8)
    collage = coffee.copy()
    face = astronaut[30:230, 140:310]  # the astronaut's head, 200 x 170
    small = (rescale(face, 0.6, channel_axis=2, anti_aliasing=True) * 255).astype(np.uint8)
    collage[40:40 + face.shape[0], 20:20 + face.shape[1]] = face
    collage[200:200 + small.shape[0], 380:380 + small.shape[1]] = small
    return {"astronaut": astronaut, "astronaut_mirror": np.ascontiguousarray(astronaut[:, ::-1]),
            "astronaut_half": half, "collage_two_faces": collage,
            "coffee": coffee, "chelsea": sd.chelsea(), "rocket": sd.rocket()}


def detections(detector: Any, image: np.ndarray) -> np.ndarray:
    """(N, 5) boxes and probabilities with probability >= PROB."""
    with torch.no_grad():
        boxes, probs = detector.detect(image)
    if boxes is None:
        return np.zeros((0, 5))
    out = np.concatenate([np.asarray(boxes, dtype=float).reshape(-1, 4),
                          np.asarray(probs, dtype=float).reshape(-1, 1)], axis=1)
    return out[out[:, 4] >= PROB]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """Per FP32 face: best IoU among the compressed detections; extra compressed detections."""
    best = [max((iou(r, g) for g in got), default=0.0) for r in ref]
    extra = sum(1 for g in got if max((iou(g, r) for r in ref), default=0.0) < IOU_KEPT)
    return {"faces": len(ref), "kept": sum(b >= IOU_KEPT for b in best), "ious": [round(b, 3) for b in best],
            "extra": extra}


def compressed_detector(target_bits: float) -> tuple[Any, dict[str, Any]]:
    import dfmpc_fx
    from facenet_pytorch import MTCNN

    det = MTCNN(keep_all=True, device="cpu")
    info: dict[str, Any] = {}
    weights = bits = 0.0
    for name in ("pnet", "rnet", "onet"):
        net = getattr(det, name)
        q = dfmpc_fx.compress(net, target_bits=target_bits, output="module")
        rep = dfmpc_fx.get_report(q)
        n = sum(layer.numel for layer in rep.layers)
        weights += n
        bits += rep.bits_per_weight * n
        info[name] = {"bits_per_weight": round(rep.bits_per_weight, 3), "widths": [l.bits for l in rep.layers]}
        setattr(det, name, q)
    info["bits_per_weight"] = round(bits / weights, 3)
    return det, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[8.0, 4.0, 3.0])
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from facenet_pytorch import MTCNN

    images = face_images()
    fp32 = MTCNN(keep_all=True, device="cpu")
    ref = {k: detections(fp32, v) for k, v in images.items()}
    print("FP32 faces (p >= 0.9):", {k: len(v) for k, v in ref.items()})
    for b in args.budgets:
        t0 = time.perf_counter()
        det, info = compressed_detector(b)
        secs = time.perf_counter() - t0
        res = {k: compare(ref[k], detections(det, v)) for k, v in images.items()}
        kept = sum(r["kept"] for r in res.values())
        faces = sum(r["faces"] for r in res.values())
        extra = sum(r["extra"] for r in res.values())
        ious = [i for r in res.values() for i in r["ious"]]
        print(f"target_bits={b:g}: {info['bits_per_weight']:.3f} bits/w (P {info['pnet']['bits_per_weight']}, "
              f"R {info['rnet']['bits_per_weight']}, O {info['onet']['bits_per_weight']}), compress {secs:.2f} s; "
              f"faces kept {kept}/{faces}, min IoU {min(ious):.3f}, extra detections {extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
