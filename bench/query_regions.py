"""Where a default-recipe query's own regions come from, measured on the three photo dev sets (issue 28).

Each set is indexed once with whole_and_regions through the server's own pipeline (kept in --work); then every
query is run with each query-side setting over the same index, in-process as `inserve eval` runs them: as the
service stores the index (its photos not yet whitened below 1024 photos) and, for holidays-dev, also after
`inserve whiten` (+W, the README's headline figure). Settings are RegionRecipeConfig fields as JSON.

    python bench/query_regions.py --models models --data ../shared/data --work /tmp/inserve-query-regions \\
        '{"query_regions": "dasr_star"}' '{"query_regions": "rmac_grid"}'

The code that ran before is compared the same way by pointing PYTHONPATH at a checkout of it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from inserve.server.config import ServerConfig
from inserve.server.evaluation import Dataset, index_dataset, run_queries
from inserve.server.instance_search import InstanceSearch

RECIPE = "whole_and_regions"
SETS = ("holidays-dev", "ukbench-dev", "composite-dev")
WHITENED = "holidays-dev"


def service(models: Path, data_dir: Path, setting: dict) -> InstanceSearch:
    config = ServerConfig(data_dir=data_dir, models=models, recipes=(RECIPE,))
    return InstanceSearch(replace(config, regions=replace(config.regions, **setting)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="*", default=["{}"], help="RegionRecipeConfig fields, as JSON")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/inserve-query-regions"))
    args = parser.parse_args()
    for name in SETS:
        if not (args.work / name / "index.sqlite").exists():
            indexing = service(args.models, args.work / name, {})
            try:
                index_dataset(indexing, Dataset.load(args.data / name))
            finally:
                indexing.close()
    whitened = args.work / f"{WHITENED}+W"
    if not whitened.exists():
        shutil.copytree(args.work / WHITENED, whitened)
        learning = service(args.models, whitened, {})
        try:
            learning.learn_whitening()
        finally:
            learning.close()
    print("| setting | holidays | holidays +W | ukbench | composite | composite loc@0.5 |\n|---|---|---|---|---|---|")
    for text in args.settings:
        setting = json.loads(text)
        scores = {}
        for name, data_dir in [*((s, args.work / s) for s in SETS), (f"{WHITENED}+W", whitened)]:
            searching = service(args.models, data_dir, setting)
            try:
                scores[name] = run_queries(searching, Dataset.load(args.data / name.removesuffix("+W")), RECIPE)
            finally:
                searching.close()
        composite = scores["composite-dev"]
        print(
            f"| {text} | {scores['holidays-dev'].map:.4f} | {scores[f'{WHITENED}+W'].map:.4f} | "
            f"{scores['ukbench-dev'].map:.4f} | {composite.map:.4f} | {composite.loc_iou50:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
