"""Why gem falls short of the reference figures: one GeM (p = 3) of the backbone's `feat` map, with the image
fed to the network four ways. Queries are whole query images, as for the reference.

- stretched: the long side to 512, the short one to the nearest multiple of 32 (server/imaging.prepare)
- stretched, in its bucket: that, padded with the mean into the smallest default shape bucket holding it
  (what the service runs, alone or batched)
- own size: the long side to 512 and the aspect ratio kept to the pixel, run as it is
- own size, padded: that, padded with the mean to the next multiple of 32

    python bench/input_size.py --models /tmp/models_v2 --data ../shared/data [--crop 3:2]

--crop W:H first cuts every image to that shape around its centre (H:W for portrait photos), for sets
whose photos all have the buckets' 4:3 shape. Prints a markdown table of mAP per dataset and input.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from inserve.engines import EngineOptions
from inserve.server.config import BatcherConfig, ImageConfig
from inserve.server.evaluation import Dataset, average_precision
from inserve.server.imaging import decode_image, network_size
from inserve.server.models import ModelBundle
from inserve.server.stages.buckets import bucket_shapes, choose_bucket, crop_map, pad_batch, parse_ratio
from inserve.server.stages.pooling import gem

LONG_SIDE = 512
Shape = tuple[int, int]


def own_size(width: int, height: int) -> tuple[int, int]:
    scale = LONG_SIDE / max(width, height)
    return round(width * scale), round(height * scale)


def on_grid(size: Shape, multiple: int) -> Shape:
    return multiple * math.ceil(size[0] / multiple), multiple * math.ceil(size[1] / multiple)


def centre_crop(image: Image.Image, ratio: tuple[int, int] | None) -> Image.Image:
    """The largest W:H (H:W when portrait) window around the centre; the image itself when ratio is None."""
    if ratio is None:
        return image
    width, height = image.size
    long, short = max(ratio), min(ratio)
    if width >= height:
        keep = (width, min(height, round(width * short / long)))
    else:
        keep = (min(width, round(height * short / long)), height)
    left, top = (width - keep[0]) // 2, (height - keep[1]) // 2
    return image.crop((left, top, left + keep[0], top + keep[1]))


class Inputs:
    """The four ways of feeding one image to the network: name -> (resized size, shape it runs in)."""

    def __init__(self, multiple: int) -> None:
        self.multiple = multiple
        self.buckets = bucket_shapes(BatcherConfig().buckets, LONG_SIDE, multiple)

    def ways(self) -> dict[str, Callable[[int, int], tuple[Shape, Shape]]]:
        def stretched(w: int, h: int) -> tuple[Shape, Shape]:
            width, height = network_size(w, h, LONG_SIDE, self.multiple)
            return (height, width), (height, width)

        def in_bucket(w: int, h: int) -> tuple[Shape, Shape]:
            size, _ = stretched(w, h)
            return size, choose_bucket(*size, self.buckets)

        def own(w: int, h: int) -> tuple[Shape, Shape]:
            width, height = own_size(w, h)
            return (height, width), (height, width)

        def own_padded(w: int, h: int) -> tuple[Shape, Shape]:
            size, _ = own(w, h)
            return size, on_grid(size, self.multiple)

        return {
            "stretched": stretched,
            "stretched, in its bucket (the service)": in_bucket,
            "own size": own,
            "own size, padded to the grid": own_padded,
        }


def describe(models: ModelBundle, image: Image.Image, size: Shape, shape: Shape) -> np.ndarray:
    """GeM of the image resized to `size`, run in the top-left corner of `shape` (mean padding), l2-normalised."""
    pixels = np.asarray(image.resize((size[1], size[0]), Image.BICUBIC), dtype=np.float32).transpose(2, 0, 1)
    batch = pad_batch([pixels], shape, models.pad_value)
    feat = crop_map(models.features(batch)["feat"][0], size, shape[0])
    vector = gem(feat)
    return vector / np.linalg.norm(vector)


def mean_ap(models: ModelBundle, dataset: Dataset, way: Callable, crop: tuple[int, int] | None) -> float:
    config = ImageConfig()

    def vector(name: str) -> np.ndarray:
        image = centre_crop(decode_image(dataset.path(name).read_bytes(), config), crop)
        return describe(models, image, *way(*image.size))

    database = np.stack([vector(name) for name in dataset.images])
    aps = []
    for query in dataset.queries:
        order = np.argsort(-(database @ vector(query.image)))
        aps.append(average_precision([dataset.images[i] for i in order], query.positives, query.junk))
    return float(np.mean(aps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--datasets", nargs="+", default=["holidays-dev", "composite-dev"])
    parser.add_argument("--crop", type=parse_ratio, default=None, help="cut every image to W:H first")
    args = parser.parse_args()
    models = ModelBundle.open(args.models, "efficientnet_lite0", EngineOptions(device="cpu"))
    datasets = [Dataset.load(args.data / name) for name in args.datasets]
    ways = Inputs(models.size_multiple).ways()
    print("| input | " + " | ".join(args.datasets) + " |")
    print("| --- |" + " --- |" * len(datasets))
    for label, way in ways.items():
        cells = [f"{mean_ap(models, dataset, way, args.crop):.3f}" for dataset in datasets]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
