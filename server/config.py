"""All settings of the service in one typed place; the CLI builds these from its flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from inserve.engines import EngineOptions
from inserve.server.errors import ConfigError

MILVUS_SCHEME = "milvus://"
MAX_PORT = 65535


MILVUS_LITE_SUFFIX = ".db"
STORE_FORMS = "milvus://HOST:PORT (a shared Milvus), FILE.db (a milvus-lite file) or a directory (hnswlib + SQLite)"


def milvus_uri(store: str) -> str | None:
    """The pymilvus URI of a `--store` value: milvus://HOST:PORT -> http://HOST:PORT, a file *.db -> that
    milvus-lite file; None for a data directory (the embedded hnswlib + SQLite). ConfigError for a value that is
    none of these: another URL scheme, an empty value, or a file that is neither a directory nor *.db."""
    if not store:
        raise ConfigError(f"--store is empty: give {STORE_FORMS}")
    if store.startswith(MILVUS_SCHEME):
        address = store[len(MILVUS_SCHEME) :].rstrip("/")
        if ":" not in address:
            raise ConfigError(f"--store {store}: give milvus://HOST:PORT")
        return "http://" + address
    if "://" in store:
        raise ConfigError(f"--store {store}: the only URL scheme is {MILVUS_SCHEME}; give {STORE_FORMS}")
    if store.endswith(MILVUS_LITE_SUFFIX):
        return store
    path = Path(store)
    if path.is_file() or (not path.is_dir() and path.suffix):
        raise ConfigError(f"--store {store} names a file that is not a milvus-lite *.db; give {STORE_FORMS}")
    return None


@dataclass(frozen=True)
class ImageConfig:
    """How images are checked and resized before the network sees them."""

    long_side: int = 512
    max_pixels: int = 40_000_000  # decoded pixels; larger declared sizes are refused before decoding
    min_side: int = 16
    max_aspect: float = 12.0
    thumbnail_side: int = 256  # JPEG thumbnail stored per image for result pictures (0 = none)
    # decoders untrusted bytes may reach (Pillow's names); every other format is refused unread
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")  # JPEG includes MPO (phones)


# how DASR seeds become boxes (server/stages/dasr.py): thresholded maps, one pass per seed; weighted moments of
# every seed's map from one pass of the adjoint graph; or adjoint boxes for NMS and exact maps for the survivors
REGION_MODES = ("exact", "adjoint", "hybrid")
STAR_SEED_RULES = ("above_mean", "all", "local_maxima")
# what a live stream does with frames that arrive while its window is full (server/video/live.py); the proto's
# Overload enum names the same, in this order
OVERLOADS = ("wait", "drop")  # DASR* seeds: seed 004's, every cell, DASR's peaks


@dataclass(frozen=True)
class DasrConfig:
    """DASR region extraction (seed 004 section III)."""

    stop_stride: int | None = None  # None = the export's default
    tau: float = 0.1  # threshold on the [0,1]-normalised probability map
    shape: str = "moments"  # "moments": pixels >= tau, 2-sigma ellipse; "official": 95th percentile
    nms_iou: float = 0.3  # beta of DASR*
    mode: str = "adjoint"  # one of REGION_MODES; why adjoint: server/stages/dasr.py
    sigmas: float = 1.5  # adjoint boxes: centroid +- sigmas standard deviations of the weighted map
    star_seeds: str = "above_mean"  # one of STAR_SEED_RULES
    max_regions: int = 64  # per image, best first
    seeds_per_run: int = 48  # seeds back-propagated in one engine run (memory bound)

    def __post_init__(self) -> None:
        if self.mode not in REGION_MODES:
            raise ConfigError(f"unknown DASR region mode {self.mode!r}; choose one of {', '.join(REGION_MODES)}")
        if self.star_seeds not in STAR_SEED_RULES:
            raise ConfigError(f"unknown DASR* seeds {self.star_seeds!r}; choose one of {', '.join(STAR_SEED_RULES)}")
        if self.sigmas <= 0:
            raise ConfigError(f"sigmas must be positive, got {self.sigmas}")


@dataclass(frozen=True)
class CamConfig:
    """Seed 001: class-weighted convolutional features."""

    mode: str = "offline"  # "offline" (OfA: each image's own top classes) or "online" (OnA: the query's)
    classes: int = 32  # N_C: class vectors summed (at most the CAM head's top-N)
    pca_classes: int = 16  # N_pca: each image's first N class vectors train the class-vector whitening
    rerank_classes: int = 2  # classes whose mean CAM gives the re-ranking boxes
    thresholds: tuple[float, ...] = (0.01, 0.1, 0.2, 0.3, 0.4)  # fractions of the CAM's maximum


@dataclass(frozen=True)
class ClustersConfig:
    """Seed 003: max-pooling over normalized-cut clusters of feature-map locations."""

    pca_dims: int = 5  # C: local vectors are PCA-reduced to this many dimensions before clustering (4-7)
    feature_clusters: tuple[int, ...] = (5, 20)  # one normalized cut per count
    colour_clusters: int = 5


@dataclass(frozen=True)
class DetectorConfig:
    """torchvision Faster R-CNN exported by `inserve export --detector`; no weights ship with inserve."""

    path: Path | None = None  # detector.onnx, or the folder `inserve export --detector` wrote
    proposals: int = 100  # RPN proposals kept per image as DeepVision regions
    top_k: int = 2  # detections cropped per image by deep_region (seed 002: K = 2)


QUERY_REGION_SOURCES = ("dasr_star", "rmac_grid")


@dataclass(frozen=True)
class RegionRecipeConfig:
    """DeepVision (seed 000), deep region CNN (seed 002) and DASR*+VLAD (seed 004) settings."""

    deep_region_source: str = "detector"  # "detector" (seed 002) or "dasr_star" (its top-K regions instead)
    deep_region_fusion: str = "concat"  # "concat", "mean" or "max" of the K crop embeddings
    # crop-and-re-embed (deep_region, dasr_star_crops): crops keep their aspect ratio, long side to this; the
    # box grows by crop_margin x its size on each side first (composite-dev: margin 0 beats 0.1 and 0.2)
    crop_long_side: int = 256
    crop_margin: float = 0.0
    vlad_k: int = 4  # codebook size (seed 004)
    vlad_alpha: float = 0.5  # power-law exponent
    # whole_and_regions: weight of the mean of the query's own regions' best matches (the rest: its crop's best
    # match); chosen on the dev sets (bench/fusion.py)
    region_set_weight: float = 0.4
    # whole_and_regions, queries without a box (a whole photo): weight of the photos' whitened R-MAC similarity,
    # the rest on the mean of the query's own regions' best matches; chosen on the dev sets (bench/fusion.py)
    whole_weight: float = 0.4
    # whole_and_regions, queries with a box: the crop is also matched as seen at this long side (about a small
    # instance's resolution in a 512-px photo, upscaled as the index's crops of one are), its best view counting;
    # composite-dev 0.828 -> 0.867 (bench/fusion.py); 0 = the crop as given only
    query_low_side: int = 96
    # whole_and_regions: the hit's box is the mean of the image's region boxes weighted by softmax(similarity to
    # the query's crop / this); 0 = the best region's box (composite-dev localisation: 0.515 at 0, 0.784 at 0.05)
    box_temperature: float = 0.05
    # whole_and_regions: where a query's own regions come from (QUERY_REGION_SOURCES): DASR* on its crop, or the
    # R-MAC grid of its crop (no DASR graph at query time)
    query_regions: str = "rmac_grid"

    def __post_init__(self) -> None:
        if self.query_regions not in QUERY_REGION_SOURCES:
            raise ConfigError(
                f"unknown query region source {self.query_regions!r}; choose one of {', '.join(QUERY_REGION_SOURCES)}"
            )
        for name in ("region_set_weight", "whole_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.query_low_side < 0:
            raise ConfigError(f"query_low_side must be >= 0 (0 = off), got {self.query_low_side}")
        if self.box_temperature < 0:
            raise ConfigError(f"box_temperature must be >= 0, got {self.box_temperature}")


SCORING_PRECISIONS = ("float16", "float32")


@dataclass(frozen=True)
class IndexConfig:
    hnsw_m: int = 16
    ef_construction: int = 200
    ef_search: int = 256
    # learn PCA-whitening once a vector index holds this many vectors per dimension (0 = never). Off by default:
    # whitening learned on the index's own vectors lowered mAP on composite-dev for every region descriptor we
    # measured (pooled DASR* regions 0.137 -> 0.131; re-embedded region crops 0.815 -> 0.664); learn it with
    # `inserve whiten` where it helps, e.g. from a large collection.
    auto_whiten_per_dim: float = 0.0
    whiten_dims: int | None = None  # None = all dimensions the data supports
    # regularised whitening: component i scaled by (lambda_i + a lambda_1)^-1/2 (stages/whitening.py); 0 = plain
    whiten_shrinkage: float = 0.1
    # compact spaces (SpaceSpec.compact: whole_and_regions' regions): the graph holds a PCA reduction to this many
    # dims learned on the space's own vectors, SQLite every vector at full dims in int8 (server/index/codec.py);
    # 0 = full dims, float32. Learned once the space holds compact_after vectors and again each time it doubles,
    # up to 64 x compact_after (bench/README.md, "Compact storage": 384 dims, ~29 KiB per image, cost the dev sets
    # <= 0.010 mAP learned on all their regions, composite-dev 0.036 learned on the first half)
    compact_dims: int = 384
    compact_after: int = 1024
    # vectors added before the graphs are snapshot again; whatever SQLite holds beyond the last snapshot is
    # added back at start, so this trades snapshot time for start-up time, never data
    snapshot_every: int = 20_000
    # how the index keeps each space's vectors in memory for scoring search candidates (server/index/
    # scoring_table.py): float16 halves the memory, float32 scores exactly as the graph does
    scoring_precision: str = "float16"

    def __post_init__(self) -> None:
        if self.compact_dims < 0 or self.compact_after < 2:
            raise ConfigError(
                f"compact_dims must be >= 0 and compact_after >= 2, got {self.compact_dims} and {self.compact_after}"
            )
        if self.scoring_precision not in SCORING_PRECISIONS:
            raise ConfigError(
                f"unknown scoring precision {self.scoring_precision!r}; choose one of {', '.join(SCORING_PRECISIONS)}"
            )


@dataclass(frozen=True)
class BatcherConfig:
    """The dynamic batcher shared by every RPC: how long images wait for company, and how many may wait.

    Limits: at most `queue_depth` images wait for the networks, over all RPCs; an IndexImages or Search
    call (or a SearchStream query) that would go beyond it gets RESOURCE_EXHAUSTED at once, while video
    keyframes wait for room (their video was admitted already). One stream has at most `stream_window`
    requests in flight. A batch holds at most `max_batch` images of one shape bucket and closes
    `max_delay_ms` after its first image arrived. On the two-core CPU of bench/README.md the backbone's
    per-image cost does not fall with the batch size and max_batch 1 served faster; batching is for GPUs.
    """

    max_batch: int = 8  # images per backbone / DASR run
    max_delay_ms: float = 5.0  # how long the first image of a batch waits for more
    queue_depth: int = 64  # images waiting to run; beyond it new work gets RESOURCE_EXHAUSTED
    runners: int = 1  # batches run at once (each engine run uses the engine's own threads)
    # runners beside them that take only searches, so that a search never waits for a batch of images being
    # described (0: searches go first in the runners' queue, but wait for the batch running)
    urgent_runners: int = 1
    # network input shapes as width:height ratios at the configured long side; every image is padded into
    # the smallest that holds it, alone or batched, so its vectors do not depend on its company
    buckets: tuple[str, ...] = ("16:9", "4:3", "1:1", "3:4")  # wide (video), landscape, square, portrait
    stream_window: int = 8  # requests of one stream (IndexImages, SearchStream) in flight at once, at most

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.runners < 1 or self.stream_window < 1 or self.urgent_runners < 0:
            raise ConfigError(f"max_batch, runners and stream_window must be >= 1, urgent_runners >= 0, got {self}")
        if self.queue_depth < self.max_batch:
            raise ConfigError(
                f"queue_depth {self.queue_depth} is below max_batch {self.max_batch}: need max_batch <= queue_depth"
            )

    @property
    def window(self) -> int:
        """A stream's requests in flight: never more than the queue holds, or a stream alone would be refused."""
        return min(self.stream_window, self.queue_depth)


@dataclass(frozen=True)
class VideoConfig:
    """Video keyframe indexing: where server-side files may be read from, and keyframe selection defaults.

    Limits: IndexVideo reads server files under `media_root` only (anything else, through `..` or a
    symlink too, is PERMISSION_DENIED; None = uploads only); an upload beyond `max_upload_bytes` and a
    video beyond `max_concurrent` indexing at once get RESOURCE_EXHAUSTED; frames larger than
    ImageConfig.max_pixels are INVALID_ARGUMENT. The selection defaults below apply unless a request's
    KeyframeOptions override them.
    """

    media_root: Path | None = None  # IndexVideo may name files under this folder only (None = uploads only)
    max_upload_bytes: int = 2 << 30
    max_concurrent: int = 2  # videos indexing at once; more get RESOURCE_EXHAUSTED
    scene_threshold: float = 0.3  # chi-square distance of 8x8x8 RGB histograms that starts a new shot
    min_interval_s: float = 0.5  # keyframes at least this far apart
    max_interval_s: float = 2.0  # and at most this far apart within a shot
    iframes_only: bool = False  # consider only the codec's intra frames (decodes much less)
    histogram_side: int = 64  # frames are shrunk to this many pixels on the long side for the histogram
    progress_interval_s: float = 0.25  # IndexVideo sends progress at most this often (and once when done)
    # live streams (IndexLiveStream): how many at once, and how many keyframes of one may be described or waiting
    # to be; beyond that the stream's Overload policy applies. A keyframe is searchable at most about
    # live_window describes after it arrived (plus the batcher's max_delay_ms), when the server keeps up
    max_live_streams: int = 4
    live_window: int = 2

    def __post_init__(self) -> None:
        if self.live_window < 1 or self.max_live_streams < 1:
            raise ConfigError(
                f"live_window and max_live_streams must be at least 1, got {self.live_window}, {self.max_live_streams}"
            )


@dataclass(frozen=True)
class LimitsConfig:
    """What one caller can make the server hold. The other limits live with what they bound:
    ServerConfig.max_message_bytes, ImageConfig.max_pixels, BatcherConfig.queue_depth,
    VideoConfig.max_upload_bytes and max_concurrent."""

    # calls served at once, health checks not counted (server/grpc/call_slots.py); more get RESOURCE_EXHAUSTED. Calls
    # that stream requests take at most max_concurrent_streams of them (None: three quarters), so idle streams
    # never hold every slot; a stream that keeps the server waiting stream_idle_timeout_s for its next message
    # ends with DEADLINE_EXCEEDED (None = never)
    max_concurrent_rpcs: int | None = 64
    max_concurrent_streams: int | None = None
    stream_idle_timeout_s: float | None = 60.0
    max_streams_per_connection: int = 32  # HTTP/2 streams one client connection may open at once
    # the longest a request (a Search, each image of an IndexImages stream, each query of a SearchStream)
    # may wait in the server; a client deadline that comes sooner wins (None = the client's only)
    request_deadline_s: float | None = 120.0
    shutdown_grace_s: float = 30.0  # on SIGTERM, how long calls in flight may take to finish
    # what an image or video may carry along (INVALID_ARGUMENT beyond): every hit returns both, and a
    # SearchStream answer holds up to max_top_k hits in one message, so 1000 x 16 KiB stays far below
    # max_message_bytes; a video's are stored once, not per keyframe
    max_source_chars: int = 4096
    max_metadata_bytes: int = 16 << 10  # keys and values, UTF-8

    @property
    def stream_slots(self) -> int | None:
        """Slots calls that stream requests may hold at once (None: no limit)."""
        if self.max_concurrent_streams is not None or self.max_concurrent_rpcs is None:
            return self.max_concurrent_streams
        return max(1, self.max_concurrent_rpcs * 3 // 4)

    def check_record(self, source: str, metadata: dict[str, str]) -> None:
        """Refuse a source or metadata beyond the limits (ValueError saying which)."""
        if len(source) > self.max_source_chars:
            raise ValueError(f"source is {len(source)} characters long, at most {self.max_source_chars}")
        size = sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())
        if size > self.max_metadata_bytes:
            raise ValueError(f"metadata is {size} bytes (keys and values), at most {self.max_metadata_bytes}")


@dataclass(frozen=True)
class SecurityConfig:
    """TLS and token authentication; both off by default (plaintext, no token: for loopback and tests)."""

    tls_cert: Path | None = None  # PEM server certificate chain; with tls_key, the server speaks TLS only
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA bundle: when set, clients must present a certificate it signed
    token_file: Path | None = None  # one accepted bearer token per line; when set, calls need one of them

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class OpsConfig:
    """Operations: Prometheus metrics and the log format."""

    metrics_port: int | None = None  # None = no metrics endpoint; 0 = any free port (logged)
    metrics_host: str = "127.0.0.1"  # loopback unless told otherwise
    log_format: str = "text"  # "text" or "json" (one JSON object a line)


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path = Path("data")  # the embedded store: hnswlib graphs + SQLite (server/index)
    # a shared store instead, for replicas (server/index/milvus.py): milvus://HOST:PORT, or a milvus-lite file *.db
    store: str = ""
    models: Path = Path("models")
    backbone: str = "efficientnet_lite0"
    recipes: tuple[str, ...] = ("whole_and_regions",)  # indexed with every recipe listed; the first is the default
    host: str = "localhost"  # loopback; beyond it without TLS or tokens the server warns (server/grpc/app.py)
    port: int = 50051
    max_message_bytes: int = 64 << 20
    workers: int = 2  # threads decoding images and writing the index (the networks run in the batcher)
    # numpy's BLAS threads (whitening, scoring): the networks' runtime owns the cores, and OpenBLAS's threads,
    # which spin after each product, slowed a gem query's network 2.5x beside it (bench/README.md, "Search
    # latency"); 0 leaves BLAS as it is
    blas_threads: int = 1
    default_top_k: int = 20
    max_top_k: int = 1000
    engine: EngineOptions = field(default_factory=EngineOptions)
    image: ImageConfig = field(default_factory=ImageConfig)
    dasr: DasrConfig = field(default_factory=DasrConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    clusters: ClustersConfig = field(default_factory=ClustersConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    regions: RegionRecipeConfig = field(default_factory=RegionRecipeConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= MAX_PORT:
            raise ConfigError(f"port {self.port} is outside 0-{MAX_PORT} (0 picks a free one)")
        if self.store and milvus_uri(self.store) is None:
            raise ConfigError(f"store {self.store!r}: give milvus://HOST:PORT or a milvus-lite file *.db")

    @property
    def default_recipe(self) -> str:
        return self.recipes[0]
