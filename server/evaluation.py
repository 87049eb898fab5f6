"""Retrieval evaluation on gnd.json datasets: mAP, mP@10 and localisation, through the serving code."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from inserve.server.instance_search import InstanceSearch
from inserve.server.search import SearchOptions, SearchPlan
from inserve.server.stages.nms import box_iou


def average_precision(ranked: list[str], positives: set[str], junk: set[str]) -> float:
    """Non-interpolated AP over the whole ranking with junk removed; unretrieved positives count 0."""
    if not positives:
        raise ValueError("a query needs at least one positive")
    hits, total = 0, 0.0
    rank = 0
    for name in ranked:
        if name in junk:
            continue
        rank += 1
        if name in positives:
            hits += 1
            total += hits / rank
    return total / len(positives)


def precision_at(ranked: list[str], positives: set[str], junk: set[str], k: int) -> float:
    kept = [name for name in ranked if name not in junk][:k]
    return sum(name in positives for name in kept) / k


@dataclass(frozen=True)
class Query:
    image: str
    box: tuple[float, float, float, float] | None
    positives: set[str]
    junk: set[str]
    boxes: dict[str, tuple[float, float, float, float]]


@dataclass(frozen=True)
class Dataset:
    name: str
    root: Path
    images: list[str]
    queries: list[Query]

    @staticmethod
    def load(root: Path) -> Dataset:
        """Read DATASET/gnd.json (see ../shared/data/README.md); images live under DATASET/images/."""
        root = Path(root)
        gnd = json.loads((root / "gnd.json").read_text())
        queries = [
            Query(
                q["image"],
                tuple(q["box"]) if q.get("box") else None,
                set(q["positives"]),
                set(q.get("junk", [])),
                {k: tuple(v) for k, v in (q.get("boxes") or {}).items()},
            )
            for q in gnd["queries"]
        ]
        return Dataset(gnd.get("name", root.name), root, list(gnd["images"]), queries)

    def path(self, image: str) -> Path:
        return self.root / "images" / image


@dataclass(frozen=True)
class EvalResult:
    dataset: str
    recipe: str
    map: float
    mp10: float
    loc_iou50: float | None
    images: int
    queries: int
    seconds: float
    index_seconds: float

    def as_json(self) -> dict:
        return {
            "map": self.map,
            "mp10": self.mp10,
            "loc_iou50": self.loc_iou50,
            "images": self.images,
            "queries": self.queries,
            "seconds": self.seconds,
            "dataset": self.dataset,
            "recipe": self.recipe,
            "index_seconds": self.index_seconds,
        }


def index_dataset(
    service: InstanceSearch,
    dataset: Dataset,
    progress: Callable[[str, int, int], None] | None = None,
    batch: int = 8,
) -> float:
    """Index the dataset's images with every recipe of `service` (an empty data directory), then learn the
    whitenings; returns the seconds it took."""
    start = time.perf_counter()
    for first in range(0, len(dataset.images), batch):
        names = dataset.images[first : first + batch]
        inputs = [service.load(dataset.path(name).read_bytes()) for name in names]
        for name, inp, described in zip(names, inputs, service.describe(inputs)):
            service.store(name, inp, described, source=str(dataset.path(name)))
        if progress:
            progress("index", first + len(names), len(dataset.images))
    service.relearn_whitening()
    return time.perf_counter() - start


@dataclass(frozen=True)
class QueryResult:
    map: float
    mp10: float
    loc_iou50: float | None  # None when the set has no boxes or the search returned none
    seconds: float


def run_queries(
    service: InstanceSearch,
    dataset: Dataset,
    recipe: str,
    options: SearchOptions = SearchOptions(),
    progress: Callable[[str, int, int], None] | None = None,
) -> QueryResult:
    """Every query of the dataset against the whole ranked database."""
    return run_query_set(service, dataset, [(recipe, options)], progress)[0]


def ranking_all(service: InstanceSearch, recipe: str, options: SearchOptions, images: int) -> SearchPlan:
    """The plan of a search that ranks the whole database (`images` hits), beyond a request's max_top_k: mAP
    needs every positive's rank."""
    return replace(service.plan(recipe, options=options), top_k=images)


def run_query_set(
    service: InstanceSearch,
    dataset: Dataset,
    configs: list[tuple[str, SearchOptions]],
    progress: Callable[[str, int, int], None] | None = None,
) -> list[QueryResult]:
    """Every query under several (recipe, options) configurations; each query image goes through the
    backbone once for all of them. `seconds` of a result counts its searches, not the shared description."""
    recipes = sorted({recipe for recipe, _ in configs})
    scores = [QueryScores() for _ in configs]
    for n, q in enumerate(dataset.queries):
        vectors = service.query_vectors(dataset.path(q.image).read_bytes(), q.box, recipes)
        for (recipe, options), score in zip(configs, scores):
            start = time.perf_counter()
            hits = service.find(ranking_all(service, recipe, options, len(dataset.images)), vectors[recipe])
            score.seconds += time.perf_counter() - start
            score.add(q, hits)
        if progress:
            progress("search", n + 1, len(dataset.queries))
    return [score.result() for score in scores]


@dataclass
class QueryScores:
    """Running AP, P@10 and localisation of one configuration over a query set."""

    aps: list[float] = field(default_factory=list)
    p10s: list[float] = field(default_factory=list)
    located: int = 0
    with_box: int = 0
    boxed: bool = False
    seconds: float = 0.0

    def add(self, q: Query, hits: list) -> None:
        ranked = [h.image.external_id for h in hits]
        self.aps.append(average_precision(ranked, q.positives, q.junk))
        self.p10s.append(precision_at(ranked, q.positives, q.junk, 10))
        found = {h.image.external_id: h.box for h in hits}
        self.boxed = self.boxed or any(box is not None for box in found.values())
        for name, truth in q.boxes.items():
            self.with_box += 1
            box = found.get(name)
            if box is not None and box_iou(np.array(box), np.array(truth))[0, 0] >= 0.5:
                self.located += 1

    def result(self) -> QueryResult:
        loc = self.located / self.with_box if self.with_box > 0 and self.boxed else None
        return QueryResult(float(np.mean(self.aps)), float(np.mean(self.p10s)), loc, self.seconds)


def evaluate(
    service: InstanceSearch,
    dataset: Dataset,
    recipe: str,
    options: SearchOptions = SearchOptions(),
    progress: Callable[[str, int, int], None] | None = None,
    batch: int = 8,
) -> EvalResult:
    """Index the dataset's images into `service` (an empty data directory), then run every query."""
    index_seconds = index_dataset(service, dataset, progress, batch)
    result = run_queries(service, dataset, recipe, options, progress)
    return EvalResult(
        dataset.name,
        recipe,
        result.map,
        result.mp10,
        result.loc_iou50,
        len(dataset.images),
        len(dataset.queries),
        index_seconds + result.seconds,
        index_seconds,
    )
