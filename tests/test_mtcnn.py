"""facenet-pytorch's MTCNN (PReLU, no BatchNorm; weights in the wheel) at 4 bits per weight
keeps every face FP32 finds on photos built offline, and finds none where FP32 finds none."""
from __future__ import annotations

import pytest

pytest.importorskip("facenet_pytorch")
pytest.importorskip("skimage")


def test_four_bits_per_weight_keeps_every_face(benchmark_module) -> None:
    mtcnn_bench = benchmark_module("mtcnn")
    from facenet_pytorch import MTCNN

    images = mtcnn_bench.face_images()
    fp32 = MTCNN(keep_all=True, device="cpu")
    ref = {k: mtcnn_bench.detections(fp32, v) for k, v in images.items()}
    assert sum(len(v) for v in ref.values()) == 5  # one face in three photos, two in the collage
    det, info = mtcnn_bench.compressed_detector(4.0)
    assert info["bits_per_weight"] <= 4.0 and min(info[n]["bits_per_weight"] for n in ("pnet", "rnet", "onet")) > 3.0
    for name, image in images.items():
        res = mtcnn_bench.compare(ref[name], mtcnn_bench.detections(det, image))
        assert res["kept"] == res["faces"] and res["extra"] == 0, (name, res)
