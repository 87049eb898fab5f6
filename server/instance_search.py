"""The service without its transport: index, search, delete, stats over one data directory.

The gRPC servicer and `inserve eval` both drive this class, so evaluation measures exactly what
the server does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

from threadpoolctl import threadpool_limits

from inserve.server.batcher import DynamicBatcher
from inserve.server.config import ServerConfig
from inserve.server.errors import LiveStreamBusy, RecipeUnavailable, RequestError, UnavailableError
from inserve.server.grouping import GROUPINGS, group_hits
from inserve.server.imaging import NetworkInput
from inserve.server.index import DuplicateId, Index, NewKeyframe, SpaceStats, open_index, transforms
from inserve.server.index.store import IMAGE_TAKES_ID, VIDEO_TAKES_ID, LiveResume
from inserve.server.latency import LatencyHistogram
from inserve.server.models import ModelBundle, ServingShapes
from inserve.server.pipeline import DescribeJob, Pipeline, QueryJob
from inserve.server.recipes import (
    ImageVectors,
    QueryVector,
    Recipe,
    build_recipes,
    recipe_specs,
    sources,
)
from inserve.server.search import REGION_SET_DEPTH, Hit, SearchOptions, SearchPlan, region_set_search, search

log = logging.getLogger(__name__)

LIVE_TAKES_ID = "a live stream is being indexed under this id"
LIVE_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds


@dataclass(frozen=True)
class Indexed:
    external_id: str
    width: int
    height: int
    described: dict[str, ImageVectors]


@dataclass(frozen=True)
class Stats:
    images: int
    regions: int
    spaces: list[SpaceStats]
    backbone: str
    recipes: tuple[str, ...]
    videos: int = 0
    keyframes: int = 0


def serving_shapes(config: ServerConfig) -> ServingShapes:
    """What this configuration feeds the graphs (for TensorRT's optimisation profiles)."""
    return ServingShapes(
        config.batcher.buckets, config.image.long_side, config.batcher.max_batch, config.dasr.seeds_per_run
    )


def describing_pipeline(config: ServerConfig, models: ModelBundle, recipes: dict[str, Recipe]) -> Pipeline:
    """The pipeline that describes images with these recipes, their DASR engines opened first: what the
    service and each bulk-indexing worker (server/bulk_index.py) run."""
    if any(recipe.dasr_peaks for recipe in recipes.values()):
        sources.dasr_engines(models, config.dasr)
    return Pipeline(models, recipes, config.image, config.batcher.buckets, config.dasr)


def add_described(
    index: Index,
    external_id: str,
    described: dict[str, ImageVectors],
    *,
    width: int,
    height: int,
    thumbnail: bytes = b"",
    source: str = "",
    metadata: dict[str, str] | None = None,
    replace: bool = False,
) -> None:
    """Commit an image as every recipe described it (raises DuplicateId unless `replace`): what the service
    and bulk indexing (server/bulk_index.py) store."""
    vectors = [v for image_vectors in described.values() for v in image_vectors.vectors]
    index.add_image(
        external_id,
        vectors,
        width=width,
        height=height,
        source=source,
        metadata=metadata,
        replace=replace,
        thumbnail=thumbnail,
    )


class InstanceSearch:
    """Every image goes through one dynamic batcher, whoever asks: RPCs, video indexing, evaluation."""

    def __init__(self, config: ServerConfig, models: ModelBundle | None = None) -> None:
        self.config = config
        if config.blas_threads:  # process-wide, for as long as the process runs
            threadpool_limits(config.blas_threads, user_api="blas")
        self.models = models or ModelBundle.open(config.models, config.backbone, config.engine, serving_shapes(config))
        self.recipes = build_recipes(config.recipes, config)
        self.unavailable: dict[str, str] = {}
        for name, recipe in self.recipes.items():
            try:
                recipe.check()
            except RecipeUnavailable as exc:
                self.unavailable[name] = str(exc)
                log.warning("recipe %s is unavailable (the others are served): %s", name, exc)
        available = {name: r for name, r in self.recipes.items() if name not in self.unavailable}
        self.pipeline = describing_pipeline(config, self.models, available)
        self.index = open_index(config.data_dir, config.store, config.index, recipe_specs(self.recipes))
        self.batcher = DynamicBatcher(
            self.pipeline.run, self.pipeline.job_bucket, config.batcher, urgent=lambda job: isinstance(job, QueryJob)
        )
        self._whitening = threading.Lock()
        self._live: set[str] = set()  # stream ids a live connection is writing to
        self.live_latency = LatencyHistogram(LIVE_LATENCY_BUCKETS)  # live keyframes: arrival to searchable, s
        self._live_lock = threading.Lock()

    def load(self, data: bytes) -> NetworkInput:
        return self.pipeline.load(data)

    def submit_describe(
        self, inputs: list[NetworkInput], deadline: float | None = None, wait: bool = False
    ) -> list[Future[dict[str, ImageVectors]]]:
        """Queue images to describe with every recipe; raises Overloaded when the queue is full (unless
        `wait`). `deadline` in time.monotonic() seconds."""
        return self.batcher.submit([DescribeJob(inp) for inp in inputs], deadline, wait)

    def describe(self, inputs: list[NetworkInput]) -> list[dict[str, ImageVectors]]:
        """Blocking: describe images through the batcher, a batch's worth at a time."""
        step = self.config.batcher.max_batch
        described = []
        for start in range(0, len(inputs), step):
            futures = self.submit_describe(inputs[start : start + step], wait=True)
            described += [future.result() for future in futures]
        return described

    def store(
        self,
        external_id: str,
        inp: NetworkInput,
        described: dict[str, ImageVectors],
        *,
        source: str = "",
        metadata: dict[str, str] | None = None,
        replace: bool = False,
    ) -> Indexed:
        """Commit one described image (raises DuplicateId unless `replace`); learns whitening when due."""
        add_described(
            self.index,
            external_id,
            described,
            width=inp.width,
            height=inp.height,
            thumbnail=inp.thumbnail,
            source=source,
            metadata=metadata,
            replace=replace,
        )
        self._whiten_when_due()
        return Indexed(external_id, inp.width, inp.height, described)

    def index_image(self, external_id: str, data: bytes, **kwargs: object) -> Indexed:
        inp = self.load(data)
        (described,) = self.describe([inp])
        return self.store(external_id, inp, described, **kwargs)

    def _whiten_when_due(self) -> None:
        if not self._whitening.acquire(blocking=False):
            return
        try:
            transforms.learn_transforms(self.index, transforms.due)
        finally:
            self._whitening.release()

    def recipe_name(self, recipe: str) -> str:
        name = recipe or self.config.default_recipe
        if name not in self.recipes:
            raise RequestError(f"unknown recipe {name!r}; this server indexes with {list(self.recipes)}")
        if name in self.unavailable:
            raise UnavailableError(f"recipe {name} is unavailable on this server: {self.unavailable[name]}")
        return name

    def plan(self, recipe: str = "", top_k: int = 0, options: SearchOptions = SearchOptions()) -> SearchPlan:
        """Every choice of a search checked, in one place, and the defaults filled in: the recipe ("" = the
        default), top_k (0 = the default), query expansion and re-ranking (None = the recipe's), the grouping.
        Raises RequestError, or UnavailableError when the recipe needs a model that this index lacks."""
        name = self.recipe_name(recipe)
        if top_k < 0 or top_k > self.config.max_top_k:
            raise RequestError(f"top_k must be between 1 and {self.config.max_top_k} (0 = default), got {top_k}")
        chosen = self.recipes[name]
        rerank = chosen.default_rerank if options.rerank_top is None else options.rerank_top
        expansion = chosen.default_query_expansion if options.query_expansion is None else options.query_expansion
        for label, value in (("query_expansion", expansion), ("rerank_top", rerank)):
            if value < 0 or value > self.config.max_top_k:
                raise RequestError(f"{label} must be between 0 and {self.config.max_top_k}, got {value}")
        if rerank and chosen.rerank_kind is None:
            raise RequestError(f"recipe {name} stores no regions: spatial re-ranking needs a recipe that does")
        if (rerank or expansion) and chosen.region_set_weight is not None:
            raise RequestError(
                f"recipe {name} scores every candidate by all its regions: it takes no query_expansion or rerank_top"
            )
        if options.group not in GROUPINGS:
            raise RequestError(f"unknown grouping {options.group!r}; choose one of {GROUPINGS}")
        self._check_learned(name)
        return SearchPlan(name, top_k or self.config.default_top_k, SearchOptions(expansion, rerank, options.group))

    def _check_learned(self, name: str) -> None:
        for model in self.recipes[name].learned_models:
            if self.index.learned(name, model) is None:
                raise UnavailableError(
                    f"recipe {name} needs a {model} learned on other data: run `inserve learn-codebook "
                    f"--data-dir {self.config.data_dir} --from DIR` (DIR: another data directory or image folder)"
                )

    def submit_query(
        self,
        inp: NetworkInput,
        box: tuple[float, float, float, float] | None,
        plan: SearchPlan,
        deadline: float | None = None,
    ) -> Future[QueryVector]:
        """Queue a query image (box checked here: ImageError); raises Overloaded when the queue is full."""
        (future,) = self.batcher.submit([self.pipeline.query_job(inp, box, plan.recipe)], deadline)
        return future

    def find(self, plan: SearchPlan, query: QueryVector) -> list[Hit]:
        """Ranked hits of a query vector; grouped per video or shot on request (asking the index for more
        hits until top_k groups are found or it has no more)."""
        recipe, top_k, options = plan.recipe, plan.top_k, plan.options
        chosen = self.recipes[recipe]

        def ranked(k: int) -> list[Hit]:
            if chosen.region_set_weight is not None:
                weight, depth = chosen.region_set_weight, max(k, REGION_SET_DEPTH)
                source, temperature = chosen.region_source, chosen.box_temperature
                return region_set_search(
                    self.index, recipe, query, k, weight, depth, source, temperature, chosen.whole_weight
                )
            return search(self.index, recipe, query, k, options, chosen.rerank_kind, chosen.region_source)

        with self.index.reading():  # a write (a re-indexed video) lands before or after, never in the middle
            if options.group == "none":
                return ranked(top_k)
            fetch = 4 * top_k
            while True:
                hits = ranked(fetch)
                grouped = group_hits(hits, options.group)
                if len(grouped) >= top_k or len(hits) < fetch:
                    return grouped[:top_k]
                fetch *= 4

    def search(
        self,
        data: bytes | NetworkInput,
        box: tuple[float, float, float, float] | None = None,
        top_k: int = 0,
        recipe: str = "",
        options: SearchOptions = SearchOptions(),
    ) -> list[Hit]:
        plan = self.plan(recipe, top_k, options)
        inp = data if isinstance(data, NetworkInput) else self.load(data)
        return self.find(plan, self.submit_query(inp, box, plan).result())

    def thumbnails(self, hits: list[Hit]) -> dict[int, bytes]:
        """The stored thumbnails of hits' images, by image row id."""
        return self.index.thumbnails([hit.image.id for hit in hits])

    def query_vectors(
        self, data: bytes | NetworkInput, box: tuple[float, float, float, float] | None, recipes: list[str]
    ) -> dict[str, QueryVector]:
        """One query image described by several recipes with one backbone run, outside the batcher (the
        quality bench compares recipes and options on the same queries this way)."""
        names = [self.recipe_name(r) for r in recipes]
        inp = data if isinstance(data, NetworkInput) else self.load(data)
        return self.pipeline.queries(inp, box, names)

    def store_video(
        self, video_id: str, keyframes: list[NewKeyframe], *, source: str = "", metadata: dict[str, str] | None = None
    ) -> int:
        """Replace a video's keyframes in one transaction; returns how many keyframes it had before."""
        replaced = self.index.replace_video(video_id, keyframes, source=source, metadata=metadata)
        self._whiten_when_due()
        return replaced

    def append_keyframes(
        self,
        video_id: str,
        keyframes: list[NewKeyframe],
        *,
        live: bool,
        source: str = "",
        metadata: dict[str, str] | None = None,
    ) -> list[NewKeyframe]:
        """Add keyframes of a live stream, or of a video indexed for the first time, in one transaction (those
        stored already are skipped); returns those added."""
        added = self.index.append_keyframes(video_id, keyframes, live=live, source=source, metadata=metadata)
        self._whiten_when_due()
        return added

    def live_resume(self, stream_id: str) -> LiveResume | None:
        """Where a live stream continues (None: new). DuplicateId when an image or a video file holds the id."""
        return self.index.live_resume(stream_id)

    @contextmanager
    def claim_live(self, stream_id: str) -> Iterator[None]:
        """One live connection per stream id at a time, here and on every replica of a shared store (the
        index's claim); a video may not replace a stream being written."""
        with self._live_lock:
            if stream_id in self._live:
                raise LiveStreamBusy(stream_id)
            self._live.add(stream_id)
        try:
            with self.index.claim_live(stream_id):
                yield
        finally:
            with self._live_lock:
                self._live.discard(stream_id)

    def check_id_free(self, external_id: str, video: bool = False, replace: bool = False) -> None:
        """Raise DuplicateId when an image (`video`: a video) may not take this id: images and videos share one
        namespace, and an image id is taken unless it is replaced. Asked before anything is decoded; the store
        checks again when it commits."""
        if external_id in self._live:
            raise DuplicateId(external_id, LIVE_TAKES_ID)
        holder = self.index.id_holder(external_id)
        if holder == "video" and not video:
            raise DuplicateId(external_id, VIDEO_TAKES_ID)
        if holder == "image" and (video or not replace):
            raise DuplicateId(external_id, IMAGE_TAKES_ID if video else DuplicateId.TAKEN)

    def delete(self, external_ids: list[str]) -> tuple[int, list[str]]:
        return self.index.delete(external_ids)

    def learn_whitening(self, recipe: str | None = None) -> dict[tuple[str, str], int]:
        """(Re)learn whitening of every space (of one recipe) from all its raw vectors."""
        with self._whitening:
            return transforms.learn_transforms(self.index, transforms.any_vectors, recipe)

    def relearn_whitening(self) -> None:
        """Learn whitening from all vectors of every space that holds enough of them (batch indexing)."""
        with self._whitening:
            transforms.learn_transforms(self.index, transforms.ready)

    def stats(self) -> Stats:
        spaces = self.index.stats()
        regions = sum(s.vectors for s in spaces if s.kind == "region")
        videos, keyframes = self.index.count_videos()
        return Stats(
            self.index.count_images(), regions, spaces, self.models.name, tuple(self.recipes), videos, keyframes
        )

    def close(self) -> None:
        self.batcher.close()
        self.index.close()
