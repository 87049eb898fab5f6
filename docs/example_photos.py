"""Photos for the README's example: scikit-image samples, with the cat's head pasted into three of them.

    python docs/example_photos.py OUT_DIR

Writes OUT_DIR/index/*.jpg (the collection) and OUT_DIR/query.jpg (the cat photo); the README searches
the collection with the cat's head as the box.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

HEAD = (100, 30, 330, 290)  # the cat's head in chelsea.jpg, x1,y1,x2,y2
SCENES = {"astronaut": (0.55, 0.55, 0.35), "rocket": (0.05, 0.6, 0.45), "coffee": (0.6, 0.05, 0.4)}
OTHERS = ("camera", "immunohistochemistry", "coins", "page", "hubble_deep_field")


def rgb(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image).convert("RGB")


def main(out: Path) -> None:
    (out / "index").mkdir(parents=True, exist_ok=True)
    cat = rgb(data.chelsea())
    cat.save(out / "query.jpg", quality=92)
    head = cat.crop(HEAD)
    for name, (x, y, scale) in SCENES.items():
        scene = rgb(getattr(data, name)())
        small = head.resize((round(head.width * scale), round(head.height * scale)), Image.BICUBIC)
        scene.paste(small, (round(x * scene.width), round(y * scene.height)))
        scene.save(out / "index" / f"{name}_with_cat.jpg", quality=92)
    for name in OTHERS:
        rgb(getattr(data, name)()).save(out / "index" / f"{name}.jpg", quality=92)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
