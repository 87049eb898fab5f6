"""Images in, index vectors and query vectors out: decode, resize, one backbone run per bucket batch, recipes.

Every image runs padded into its shape bucket, alone or not, so its vectors are the same whichever
images share its batch; the dynamic batcher calls `run` with the jobs of one bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from inserve.server.config import BatcherConfig, DasrConfig, ImageConfig
from inserve.server.imaging import NetworkInput, decode_image, prepare, validate_box
from inserve.server.models import ModelBundle
from inserve.server.recipes import FeatureBatch, ImageVectors, QueryVector, Recipe, sources
from inserve.server.stages.buckets import Shape, bucket_shapes, choose_bucket, crop_map, pad_batch
from inserve.server.stages.dasr import batch_functionals


@dataclass(frozen=True)
class DescribeJob:
    """Describe an image for the index with some recipes (None = all of the pipeline's)."""

    inp: NetworkInput
    recipes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class QueryJob:
    """The query vector of an image under one recipe; `box` in network pixels, None = the whole image."""

    inp: NetworkInput
    recipe: str
    box: np.ndarray | None = None


Job = DescribeJob | QueryJob


class Pipeline:
    def __init__(
        self,
        models: ModelBundle,
        recipes: dict[str, Recipe],
        image: ImageConfig,
        buckets: tuple[str, ...] = BatcherConfig.buckets,
        dasr: DasrConfig | None = None,
    ) -> None:
        """`dasr`: the recipes' DASR configuration; when its regions come from the adjoint moments, batches to
        describe run the moments graph in place of the backbone (one forward pass for both)."""
        self.models = models
        self.recipes = recipes
        self.image = image
        self.shapes = bucket_shapes(buckets, image.long_side, models.size_multiple)
        self.moments_stride = None
        if dasr is not None and dasr.mode != "exact":
            self.moments_stride = sources.stop_stride(models, dasr)

    def load(self, data: bytes) -> NetworkInput:
        """Decoded, checked and resized; raises ImageError with the reason."""
        return self.prepare(decode_image(data, self.image))

    def prepare(self, image: Image.Image) -> NetworkInput:
        """A decoded RGB image (a photo, a video frame) resized for the network."""
        return prepare(image, self.image.long_side, self.models.size_multiple, self.image.thumbnail_side)

    def bucket(self, inp: NetworkInput) -> Shape:
        return choose_bucket(inp.pixels.shape[1], inp.pixels.shape[2], self.shapes)

    def job_bucket(self, job: Job) -> Shape:
        return self.bucket(job.inp)

    def features(self, inputs: list[NetworkInput], moments: bool = False) -> FeatureBatch:
        """One backbone run over images of one bucket; every map cropped back to each image's own cells.
        `moments`: also every feat cell's DASR moments (maps["moments"]), from the same forward pass."""
        shape = self.bucket(inputs[0])
        if any(self.bucket(inp) != shape for inp in inputs):
            raise ValueError("features() takes images of one shape bucket")
        pixels = pad_batch([inp.pixels for inp in inputs], shape, self.models.pad_value)
        stride = self.moments_stride if moments else None
        if stride is None:
            maps = self.models.features(pixels)
        else:
            sizes = [(inp.pixels.shape[1], inp.pixels.shape[2]) for inp in inputs]
            maps = self.models.features_and_moments(pixels, stride, batch_functionals(pixels, sizes, stride))
        cropped = {
            name: [crop_map(m, (inp.pixels.shape[1], inp.pixels.shape[2]), shape[0]) for m, inp in zip(out, inputs)]
            if out.ndim == 4
            else list(out)
            for name, out in maps.items()
        }
        return FeatureBatch(inputs, pixels, cropped, self.models, moments_stride=stride)

    def run(self, jobs: list[Job]) -> list[dict[str, ImageVectors] | QueryVector]:
        """Jobs of one bucket in one backbone run, results in order. When the images to describe need DASR
        moments, they run the moments graph (the backbone's maps come with them) and the queries the backbone
        alone: a query never pays the ~5 forward passes of its batch-mates' regions."""
        describe = [i for i, job in enumerate(jobs) if isinstance(job, DescribeJob)]
        names = {name: None for i in describe for name in (jobs[i].recipes or self.recipes)}
        peaks = tuple(sorted({p for name in names for p in self.recipes[name].dasr_peaks}))
        batch = self.features([job.inp for job in jobs]) if not peaks else None
        results: list[dict[str, ImageVectors] | QueryVector] = [{} for _ in jobs]
        if describe:
            if batch is None:
                sub = self.features([jobs[i].inp for i in describe], moments=True)
            else:
                sub = batch if len(describe) == len(jobs) else batch.subset(describe)
            sub.dasr_peaks = peaks
            for name in names:
                for i, vectors in zip(describe, self.recipes[name].describe(sub)):
                    if jobs[i].recipes is None or name in jobs[i].recipes:
                        results[i][name] = vectors
        asked = [i for i, job in enumerate(jobs) if isinstance(job, QueryJob)]
        if asked and batch is None:  # the queries' own run: their rows are 0, 1, ...
            batch, rows = self.features([jobs[i].inp for i in asked]), range(len(asked))
        else:
            rows = asked
        for i, row in zip(asked, rows):
            results[i] = self.recipes[jobs[i].recipe].query(batch.subset([row]), jobs[i].box)
        return results

    def query_job(self, inp: NetworkInput, box: tuple[float, float, float, float] | None, recipe: str) -> QueryJob:
        """Validates a query box in original pixels (ImageError) and maps it to network pixels."""
        net_box = None
        if box is not None:
            net_box = inp.to_network(np.array(validate_box(box, inp.width, inp.height), dtype=np.float32))
        return QueryJob(inp, recipe, net_box)

    def queries(
        self, inp: NetworkInput, box: tuple[float, float, float, float] | None, recipes: list[str]
    ) -> dict[str, QueryVector]:
        """Query vectors of several recipes from one backbone run (and shared region sources), as `run` would
        give each of them alone."""
        job = self.query_job(inp, box, recipes[0])
        batch = self.features([inp])
        return {name: self.recipes[name].query(batch, job.box) for name in recipes}
