"""Which EfficientNet layer describes an instance region best: average pooling of each candidate map
inside the ground-truth boxes of composite-dev, whole-image query, best box per image, cosine.

    python bench/desc_layer.py --data ../shared/data/composite-dev --backbone efficientnet_lite0

Isolates the region descriptor from the region source (the boxes are the true ones) and from
whitening (none). Prints a markdown table: layer, stride, channels, mAP, mP@10.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from inserve.export.backbones import load_backbone
from inserve.export.graphs import BackboneGraph
from inserve.export.programs import run_program
from inserve.server.config import ImageConfig
from inserve.server.evaluation import Dataset, average_precision, precision_at
from inserve.server.imaging import decode_image, prepare
from inserve.server.stages.pooling import box_average, l2_normalize

CANDIDATES = ("blocks.5", "blocks.8", "blocks.10", "blocks.12", "blocks.14", "blocks.15", "head")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/composite-dev"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()
    dataset = Dataset.load(args.data)
    loaded = load_backbone(args.backbone)
    program = loaded.spec.program(loaded.model, loaded.spec.default_desc)
    graph = BackboneGraph(loaded, program).eval()
    truth = {name: box for q in dataset.queries for name, box in q.boxes.items()}
    config = ImageConfig()

    def maps(name: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Candidate maps of one image, its box (true one, or the whole image) in network pixels, its size."""
        inp = prepare(decode_image(dataset.path(name).read_bytes(), config), config.long_side, 32)
        with torch.no_grad():
            out = run_program(program, graph.normalize(torch.from_numpy(inp.pixels[None])), set(CANDIDATES))
        box = truth.get(name, (0, 0, inp.width, inp.height))
        return {k: v[0].numpy() for k, v in out.items()}, inp.to_network(np.array([box])), inp.pixels.shape[1:]

    database = [maps(name) for name in dataset.images]
    queries = [maps(q.image) for q in dataset.queries]
    rows = []
    for layer in CANDIDATES:
        stride = database[0][2][0] // database[0][0][layer].shape[1]
        vectors = l2_normalize(np.vstack([box_average(m[layer], box, stride) for m, box, _ in database]))
        aps, p10 = [], []
        for q, (m, _, (h, w)) in zip(dataset.queries, queries):
            query = l2_normalize(box_average(m[layer], np.array([[0, 0, w, h]]), stride))[0]
            ranking = [dataset.images[i] for i in np.argsort(-(vectors @ query))]
            aps.append(average_precision(ranking, q.positives, q.junk))
            p10.append(precision_at(ranking, q.positives, q.junk, 10))
        channels = database[0][0][layer].shape[0]
        rows.append((layer, stride, channels, float(np.mean(aps)), float(np.mean(p10))))
        print(f"| {layer} | {stride} | {channels} | {rows[-1][3]:.3f} | {rows[-1][4]:.3f} |", flush=True)
    print("\n| layer | stride | channels | mAP (true boxes) | mP@10 |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]:.3f} | {row[4]:.3f} |")


if __name__ == "__main__":
    main()
