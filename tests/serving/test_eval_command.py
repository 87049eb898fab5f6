"""`inserve eval` on a tiny gnd.json dataset made in the test: the figures a hand-check predicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from photos import encode, photo, planted

SCENES = ("astronaut", "rocket", "coffee", "motorcycle")


def test_eval_prints_map_mp10_and_localisation_as_json(models_dir: Path, tmp_path: Path) -> None:
    """The cat pasted into two scenes, the camera man into one; queries are the whole cat and camera photos."""
    (tmp_path / "images").mkdir()
    cat, man = photo("chelsea"), photo("camera")
    boxes = {}
    for name, background, instance, position in (
        ("cat_in_astronaut.jpg", "astronaut", cat, (0.05, 0.1)),
        ("cat_in_rocket.jpg", "rocket", cat, (0.3, 0.5)),
        ("man_in_coffee.jpg", "coffee", man, (0.5, 0.1)),
    ):
        composite, box = planted(photo(background), instance, 0.6, position)
        (tmp_path / "images" / name).write_bytes(encode(composite))
        boxes[name] = box
    (tmp_path / "images" / "motorcycle.jpg").write_bytes(encode(photo("motorcycle")))
    for name, image in (("q_cat.jpg", cat), ("q_man.jpg", man)):
        (tmp_path / "images" / name).write_bytes(encode(image))
    gnd = {
        "name": "tiny",
        "images": [*sorted(boxes), "motorcycle.jpg"],
        "queries": [
            {
                "image": "q_cat.jpg",
                "box": None,
                "positives": ["cat_in_astronaut.jpg", "cat_in_rocket.jpg"],
                "junk": [],
                "boxes": {k: boxes[k] for k in ("cat_in_astronaut.jpg", "cat_in_rocket.jpg")},
            },
            {
                "image": "q_man.jpg",
                "box": None,
                "positives": ["man_in_coffee.jpg"],
                "junk": [],
                "boxes": {"man_in_coffee.jpg": boxes["man_in_coffee.jpg"]},
            },
        ],
    }
    (tmp_path / "gnd.json").write_text(json.dumps(gnd))
    command = [sys.executable, "-m", "inserve.clients.cli", "eval", str(tmp_path), "--recipe", "dasr_star"]
    done = subprocess.run(
        [*command, "--models", str(models_dir), "--long-side", "256", "--json", "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {"map", "mp10", "loc_iou50", "images", "queries", "seconds"} <= set(result)
    assert (result["images"], result["queries"]) == (4, 2)
    assert result["map"] == 1.0
    assert result["mp10"] == (2 / 10 + 1 / 10) / 2
    assert result["loc_iou50"] is not None and 0.0 <= result["loc_iou50"] <= 1.0
