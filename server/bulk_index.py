"""Bulk indexing on a Ray cluster (an optional extra: pip install 'inserve[cluster]').

Ray Data reads and decodes the images and videos and runs the ONNX graphs on its workers, one Describer per
worker process holding its own engines; a video's keyframes are chosen by the service's rules (VideoConfig)
on the worker that decodes it. The driver commits each described image, and each video's keyframes at once,
into the store: the same commits the service makes (a data directory has one writer: the server stopped; a
Milvus store may be shared with serving replicas). Ids already stored are left out before anything is read,
so a rerun after a crash or a stop continues where the last one ended and nothing is indexed twice. Without an
address a local Ray starts on this machine's cores.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from inserve.server.config import ServerConfig
from inserve.server.errors import REQUEST_ERRORS, IdError, VideoError
from inserve.server.ids import check_id
from inserve.server.index import open_index, transforms
from inserve.server.instance_search import add_described, describing_pipeline
from inserve.server.models import ModelBundle
from inserve.server.pipeline import DescribeJob
from inserve.server.recipes import build_recipes, recipe_specs
from inserve.server.video.decode import VIDEO_SUFFIXES
from inserve.server.video.indexer import new_keyframe, selected_frames
from inserve.server.video.keyframes import SelectionRules

CPUS_PER_WORKER = 1


@dataclass
class BulkResult:
    indexed: int = 0
    skipped: int = 0  # stored already, or given twice
    failed: dict[str, str] = field(default_factory=dict)  # id -> why (an image that does not decode...)


class Describer:
    """One per Ray worker: the pipeline the server runs, described images back as pickled records."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        engine = config.engine  # a worker reserves one CPU: its engines run one thread unless told otherwise
        if engine.intra_op_threads == 0:
            engine = replace(engine, intra_op_threads=CPUS_PER_WORKER)
        models = ModelBundle.open(config.models, config.backbone, engine)
        self.pipeline = describing_pipeline(config, models, build_recipes(config.recipes, config))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        records: list[bytes] = [b""] * len(batch["id"])
        errors: list[str] = [""] * len(batch["id"])
        by_bucket: dict[tuple, list[tuple[int, object]]] = {}
        for i, path in enumerate(batch["path"]):
            try:
                inp = self.pipeline.load(Path(str(path)).read_bytes())
            except (*REQUEST_ERRORS, OSError) as exc:
                errors[i] = str(exc)
                continue
            by_bucket.setdefault(self.pipeline.bucket(inp), []).append((i, inp))
        for members in by_bucket.values():
            described = self.pipeline.run([DescribeJob(inp) for _, inp in members])
            for (i, inp), vectors in zip(members, described):
                records[i] = pickle.dumps((inp.width, inp.height, inp.thumbnail, vectors))
        return {"id": list(batch["id"]), "record": records, "error": errors}


class VideoDescriber(Describer):
    """One per Ray worker: each video's keyframes, selected and described as IndexVideo does, as one pickled
    list of NewKeyframe."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        records: list[bytes] = [b""] * len(batch["id"])
        errors: list[str] = [""] * len(batch["id"])
        rules = SelectionRules.defaults(self.config.video)
        step = self.config.batcher.max_batch
        for i, (video_id, path) in enumerate(zip(batch["id"], batch["path"])):
            try:
                with open(str(path), "rb") as file:
                    chosen = [s for _, s, _ in selected_frames(file, rules, self.config, self.pipeline.prepare) if s]
                keyframes = []
                for start in range(0, len(chosen), step):
                    part = chosen[start : start + step]
                    described = self.pipeline.run([DescribeJob(s.inp) for s in part])
                    keyframes += [new_keyframe(str(video_id), s, d) for s, d in zip(part, described)]
                if not keyframes:
                    raise VideoError("no keyframe could be selected (no intra frames?)")
                records[i] = pickle.dumps(keyframes)
            except (*REQUEST_ERRORS, OSError) as exc:
                errors[i] = str(exc)
        return {"id": list(batch["id"]), "record": records, "error": errors}


def refusal(external_id: str, path: Path) -> str:
    """Why a file is not indexed before anything is read ("" when it may be): an id IndexImages would refuse
    (it could never be replaced through the API), or nothing to read (a dangling symlink)."""
    try:
        check_id(external_id, f"id {external_id!r} (from the file name)")
    except IdError as exc:
        return str(exc)
    if not path.is_file():
        return f"{path} is not a file (a dangling symlink?)"
    return ""


def bulk_index(
    config: ServerConfig,
    files: Iterable[tuple[str, Path]],
    address: str | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BulkResult:
    """Index (id, path) images and videos (VIDEO_SUFFIXES) into the configured store on Ray: `address` of a
    cluster (None: a local one), `workers` describing at once (None: one per CPU Ray offers). `progress(done,
    total)` after each file."""
    import ray

    index = open_index(config.data_dir, config.store, config.index, recipe_specs(build_recipes(config.recipes, config)))
    result = BulkResult()
    try:
        images: dict[str, dict[str, str]] = {}  # one entry per id, the first path given for it
        videos: dict[str, dict[str, str]] = {}
        for external_id, path in files:
            refused = refusal(external_id, Path(path))
            if refused:
                result.failed[external_id] = refused
                continue
            video = Path(path).suffix.lower() in VIDEO_SUFFIXES
            stored = index.id_holder(external_id) == "video" if video else index.contains(external_id)
            if stored or external_id in images or external_id in videos:
                result.skipped += 1
            else:
                (videos if video else images)[external_id] = {"id": external_id, "path": str(path)}
        total = len(images) + len(videos)

        if total:
            if not ray.is_initialized():
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            workers = workers or max(1, int(ray.available_resources().get("CPU", 1)))
        for batch_size, todo, describer in ((config.batcher.max_batch, images, Describer), (1, videos, VideoDescriber)):
            if not todo:
                continue
            described = ray.data.from_items(list(todo.values())).map_batches(
                describer,
                fn_constructor_args=(config,),
                batch_size=batch_size,
                concurrency=min(workers, len(todo)),
                num_cpus=CPUS_PER_WORKER,
            )
            for batch in described.iter_batches(batch_size=batch_size, batch_format="pandas"):
                for external_id, record, error in zip(batch["id"], batch["record"], batch["error"]):
                    if error:
                        result.failed[external_id] = error
                    elif describer is VideoDescriber:
                        index.replace_video(external_id, pickle.loads(record), source=todo[external_id]["path"])
                        result.indexed += 1
                    else:
                        width, height, thumbnail, vectors = pickle.loads(record)
                        add_described(index, external_id, vectors, width=width, height=height, thumbnail=thumbnail)
                        result.indexed += 1
                    if progress is not None:
                        progress(result.indexed + len(result.failed), total)
        if total:
            transforms.learn_transforms(index, transforms.ready)  # what the service learns as it grows
    finally:
        index.close()
    return result
