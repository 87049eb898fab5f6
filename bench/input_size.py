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


def input_shapes(width: int, height: int, multiple: int, buckets: list[Shape]) -> dict[str, tuple[Shape, Shape]]:
    """(size it is resized to, shape it runs in), both (height, width), of an image under each of the four ways."""
    stretched = network_size(width, height, LONG_SIDE, multiple)[::-1]
    own = network_size(width, height, LONG_SIDE, 1)[::-1]  # the aspect ratio kept to the pixel
    return {
        "stretched": (stretched, stretched),
        "stretched, in its bucket (the service)": (stretched, choose_bucket(*stretched, buckets)),
        "own size": (own, own),
        "own size, padded to the grid": (own, on_grid(own, multiple)),
    }


def describe(models: ModelBundle, image: Image.Image, size: Shape, shape: Shape) -> np.ndarray:
    """GeM of the image resized to `size`, run in the top-left corner of `shape` (mean padding), l2-normalised."""
    pixels = np.asarray(image.resize((size[1], size[0]), Image.BICUBIC), dtype=np.float32).transpose(2, 0, 1)
    batch = pad_batch([pixels], shape, models.pad_value)
    feat = crop_map(models.features(batch)["feat"][0], size, shape[0])
    vector = gem(feat)
    return vector / np.linalg.norm(vector)


def mean_aps(models: ModelBundle, dataset: Dataset, crop: tuple[int, int] | None) -> dict[str, float]:
    """mAP of the dataset under each way of feeding its images to the network."""
    config = ImageConfig()
    buckets = bucket_shapes(BatcherConfig().buckets, LONG_SIDE, models.size_multiple)

    def vectors(name: str) -> dict[str, np.ndarray]:
        image = centre_crop(decode_image(dataset.path(name).read_bytes(), config), crop)
        shapes = input_shapes(*image.size, models.size_multiple, buckets)
        return {way: describe(models, image, size, shape) for way, (size, shape) in shapes.items()}

    described = [vectors(name) for name in dataset.images]
    queries = [vectors(query.image) for query in dataset.queries]
    result = {}
    for way in described[0]:
        database = np.stack([d[way] for d in described])
        aps = []
        for query, vector in zip(dataset.queries, queries):
            order = np.argsort(-(database @ vector[way]))
            aps.append(average_precision([dataset.images[i] for i in order], query.positives, query.junk))
        result[way] = float(np.mean(aps))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--datasets", nargs="+", default=["holidays-dev", "composite-dev"])
    parser.add_argument("--crop", type=parse_ratio, default=None, help="cut every image to W:H first")
    args = parser.parse_args()
    models = ModelBundle.open(args.models, "efficientnet_lite0", EngineOptions(device="cpu"))
    datasets = [Dataset.load(args.data / name) for name in args.datasets]
    results = [mean_aps(models, dataset, args.crop) for dataset in datasets]
    print("| input | " + " | ".join(args.datasets) + " |")
    print("| --- |" + " --- |" * len(datasets))
    for way in results[0]:
        print(f"| {way} | " + " | ".join(f"{r[way]:.3f}" for r in results) + " |")


if __name__ == "__main__":
    main()
