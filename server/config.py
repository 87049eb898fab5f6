"""All settings of the service in one typed place; the CLI builds these from its flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from inserve.engines import EngineOptions


@dataclass(frozen=True)
class ImageConfig:
    """How images are checked and resized before the network sees them."""

    long_side: int = 512
    max_pixels: int = 40_000_000  # decoded pixels; larger declared sizes are refused before decoding
    min_side: int = 16
    max_aspect: float = 12.0
    thumbnail_side: int = 256  # JPEG thumbnail stored per image for result pictures (0 = none)


@dataclass(frozen=True)
class DasrConfig:
    """DASR region extraction (seed 004 section III)."""

    stop_stride: int | None = None  # None = the export's default
    tau: float = 0.1  # threshold on the [0,1]-normalised probability map
    shape: str = "moments"  # "moments": pixels >= tau, 2-sigma ellipse; "official": 95th percentile
    nms_iou: float = 0.3  # beta of DASR*
    max_regions: int = 64  # per image, best first
    seeds_per_run: int = 48  # seeds back-propagated in one engine run (memory bound)


@dataclass(frozen=True)
class IndexConfig:
    hnsw_m: int = 16
    ef_construction: int = 200
    ef_search: int = 256
    # learn PCA-whitening once a vector index holds this many vectors per dimension (0 = never)
    auto_whiten_per_dim: float = 4.0
    whiten_dims: int | None = None  # None = all dimensions the data supports


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path = Path("data")
    models: Path = Path("models")
    backbone: str = "efficientnet_lite0"
    recipes: tuple[str, ...] = ("dasr_star",)  # indexed with every recipe listed; the first is the default
    host: str = "[::]"
    port: int = 50051
    max_message_bytes: int = 64 << 20
    workers: int = 2  # threads running the networks
    default_top_k: int = 20
    max_top_k: int = 1000
    engine: EngineOptions = field(default_factory=EngineOptions)
    image: ImageConfig = field(default_factory=ImageConfig)
    dasr: DasrConfig = field(default_factory=DasrConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

    @property
    def default_recipe(self) -> str:
        return self.recipes[0]
