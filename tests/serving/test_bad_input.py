"""The bad-input sweep through the real server: every RPC gets broken, hostile or out-of-range input, each
answered with the status code that fits and a message saying what is wrong; unusual but sensible images
are accepted. Afterwards the server still serves and its index is exactly as before."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from inputs import ACCEPTED_IMAGES, BAD_IMAGES
from media import scenes_video
from photos import encode, photo
from servers import running_server
from skimage import data

from inserve.clients.client import ImageItem, InstanceSearchClient
from inserve.v1 import inserve_pb2 as pb
from inserve.v1 import inserve_pb2_grpc as pb_grpc

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXISTS = grpc.StatusCode.ALREADY_EXISTS
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
INDEXED = ("astronaut", "chelsea", "coffee", "rocket")
MAX_MESSAGE = 1 << 20  # the server's --max-message-mb 1
TOO_BIG = "larger than max"


@dataclass(frozen=True)
class Assets:
    media: Path  # the server's media root: clip.mp4, link.mp4 -> ../outside.mp4
    video: bytes  # a valid MP4 (clip.mp4)


@dataclass(frozen=True)
class Case:
    name: str
    rpc: str  # index | search | video | delete
    request: Callable[[Assets], object]  # the request message, or for streams the list of messages
    code: grpc.StatusCode  # OK = accepted
    message: str = ""  # a regex the status details must match
    hits: int | None = None  # for accepted searches: how many hits come back


def image_request(image: bytes, **fields: object) -> pb.SearchRequest:
    return pb.SearchRequest(image=image, **fields)


def chelsea() -> bytes:
    return encode(photo("chelsea"))


def box(x1: float, y1: float, x2: float, y2: float) -> pb.Box:
    return pb.Box(x1=x1, y1=y1, x2=x2, y2=y2)


def header(video_id: str = "bad-video", path: str = "", size_bytes: int = 0, **options: float) -> pb.IndexVideoRequest:
    options_given = pb.KeyframeOptions(**options)
    return pb.IndexVideoRequest(
        header=pb.VideoHeader(video_id=video_id, path=path, size_bytes=size_bytes, options=options_given)
    )


def upload(content: bytes, video_id: str = "bad-video") -> list[pb.IndexVideoRequest]:
    return [header(video_id), pb.IndexVideoRequest(chunk=content)]


def garbled(video: bytes) -> bytes:
    """The MP4 with a third of its frame data overwritten (container intact, frames undecodable)."""
    damaged = bytearray(video)
    start = video.find(b"mdat") + 100
    damaged[start : start + len(video) // 3] = np.random.default_rng(0).bytes(len(video) // 3)
    return bytes(damaged)


def image_cases() -> list[Case]:
    cases = []
    for name, make, message in BAD_IMAGES:
        request = lambda a, make=make, name=name: pb.IndexImageRequest(id=f"bad-{name}", image=make())  # noqa: E731
        cases.append(Case(f"index-{name}", "index", request, INVALID, message))
        cases.append(Case(f"search-{name}", "search", lambda a, make=make: image_request(make()), INVALID, message))
    for name, make in ACCEPTED_IMAGES:
        cases.append(Case(f"search-{name}", "search", lambda a, make=make: image_request(make()), OK, hits=4))
    return cases


CASES: list[Case] = [
    *image_cases(),
    # query boxes (chelsea is 451 x 300)
    Case("box-outside", "search", lambda a: image_request(chelsea(), box=box(500, 10, 600, 100)), INVALID, "outside"),
    Case("box-inverted", "search", lambda a: image_request(chelsea(), box=box(300, 200, 100, 50)), INVALID, "x1 < x2"),
    Case("box-zero-area", "search", lambda a: image_request(chelsea(), box=box(100, 50, 100, 90)), INVALID, "x1 < x2"),
    Case("box-nan", "search", lambda a: image_request(chelsea(), box=box(float("nan"), 0, 50, 50)), INVALID, "finite"),
    Case("box-inf", "search", lambda a: image_request(chelsea(), box=box(0, 0, float("inf"), 50)), INVALID, "finite"),
    Case("box-negative", "search", lambda a: image_request(chelsea(), box=box(-50, -50, -10, -10)), INVALID, "outside"),
    Case("box-sub-pixel", "search", lambda a: image_request(chelsea(), box=box(450.5, 0, 600, 90)), INVALID, "outside"),
    Case(
        "box-partly-negative-clipped",
        "search",
        lambda a: image_request(chelsea(), box=box(-20, -20, 200, 200)),
        OK,
        hits=4,
    ),
    # search parameters
    Case(
        "unknown-recipe", "search", lambda a: image_request(chelsea(), recipe="nope"), INVALID, "unknown recipe 'nope'"
    ),
    Case(
        "unknown-recipe-huge",
        "search",
        lambda a: image_request(chelsea(), recipe="r" * 900_000),
        INVALID,
        r"unknown recipe 'rrr.* \.\.\. .*indexes with \['gem', 'dasr_star'\]",
    ),
    Case("top-k-0-is-the-default", "search", lambda a: image_request(chelsea(), top_k=0), OK, hits=4),
    Case(
        "top-k-1001",
        "search",
        lambda a: image_request(chelsea(), top_k=1001),
        INVALID,
        "top_k must be between 1 and 1000",
    ),
    Case("top-k-huge", "search", lambda a: image_request(chelsea(), top_k=2**32 - 1), INVALID, "got 4294967295"),
    Case(
        "query-expansion-huge",
        "search",
        lambda a: image_request(chelsea(), options=pb.SearchOptions(query_expansion=10**6)),
        INVALID,
        "query_expansion must be between 0 and 1000",
    ),
    Case(
        "unknown-grouping",
        "search",
        lambda a: image_request(chelsea(), options=pb.SearchOptions(group=7)),
        INVALID,
        "unknown grouping 7",
    ),
    # ids
    Case(
        "duplicate-id",
        "index",
        lambda a: pb.IndexImageRequest(id="chelsea", image=chelsea()),
        EXISTS,
        "image 'chelsea': already indexed",
    ),
    Case("empty-id", "index", lambda a: pb.IndexImageRequest(id="", image=chelsea()), INVALID, "id is empty"),
    Case(
        "id-too-long",
        "index",
        lambda a: pb.IndexImageRequest(id="x" * 513, image=chelsea()),
        INVALID,
        "513 characters long, at most 512",
    ),
    Case(
        "id-huge",
        "index",
        lambda a: pb.IndexImageRequest(id="z" * 900_000, image=b""),
        INVALID,
        "900000 characters long",
    ),
    Case("video-id-huge", "video", lambda a: [header(video_id="v" * 900_000)], INVALID, "900000 characters long"),
    Case("image-id-with-hash", "index", lambda a: pb.IndexImageRequest(id="coll#0", image=chelsea()), INVALID, "'#'"),
    Case("video-id-with-hash", "video", lambda a: upload(a.video, video_id="v#1"), INVALID, "contains '#'"),
    Case(  # garbled frames would be INVALID_ARGUMENT: the id is refused before any decoding
        "video-id-of-an-image",
        "video",
        lambda a: upload(garbled(a.video), video_id="chelsea"),
        EXISTS,
        "an image is indexed under this id",
    ),
    Case(
        "metadata-too-large",
        "index",
        lambda a: pb.IndexImageRequest(id="meta", image=chelsea(), metadata={"k": "v" * (16 << 10)}),
        INVALID,
        "metadata is 16385 bytes",
    ),
    Case(
        "source-too-long",
        "index",
        lambda a: pb.IndexImageRequest(id="src", image=chelsea(), source="s" * 5000),
        INVALID,
        "source is 5000 characters long, at most 4096",
    ),
    Case(
        "video-metadata-too-large",
        "video",
        lambda a: [pb.IndexVideoRequest(header=pb.VideoHeader(video_id="mv", metadata={"k": "v" * (20 << 10)}))],
        INVALID,
        "metadata is",
    ),
    Case("delete-a-keyframe-id", "delete", lambda a: pb.DeleteRequest(ids=["k" * 512 + "#75"]), OK),
    Case("delete-nothing", "delete", lambda a: pb.DeleteRequest(), INVALID, "no ids given"),
    Case("delete-empty-id", "delete", lambda a: pb.DeleteRequest(ids=["chelsea", ""]), INVALID, "delete: id is empty"),
    Case("delete-id-too-long", "delete", lambda a: pb.DeleteRequest(ids=["y" * 600]), INVALID, "at most 533"),
    Case("delete-unknown-id-reports-it", "delete", lambda a: pb.DeleteRequest(ids=["never-indexed"]), OK),
    # messages over the server's size limit
    Case(
        "oversize-index",
        "index",
        lambda a: pb.IndexImageRequest(id="big", image=bytes(MAX_MESSAGE + 1000)),
        EXHAUSTED,
        TOO_BIG,
    ),
    Case("oversize-search", "search", lambda a: image_request(bytes(MAX_MESSAGE + 1000)), EXHAUSTED, TOO_BIG),
    Case("oversize-video-chunk", "video", lambda a: upload(bytes(MAX_MESSAGE + 1000)), EXHAUSTED, TOO_BIG),
    Case(
        "video-upload-over-limit",
        "video",
        lambda a: [header(), *[pb.IndexVideoRequest(chunk=bytes(600_000))] * 2],
        EXHAUSTED,
        "upload exceeds the 1048576-byte limit",
    ),
    Case(
        "video-declared-over-limit",
        "video",
        lambda a: [header(size_bytes=2 << 20)],
        EXHAUSTED,
        "upload of 2097152 bytes exceeds the 1048576-byte limit",
    ),
    # videos
    Case(
        "video-chunks-beyond-declared-size",
        "video",
        lambda a: [header(size_bytes=1000), *[pb.IndexVideoRequest(chunk=bytes(600))] * 2],
        INVALID,
        "the chunks exceed the 1000 bytes the header declared",
    ),
    Case(
        "video-upload-short-of-declared-size",
        "video",
        lambda a: [header(size_bytes=len(a.video)), pb.IndexVideoRequest(chunk=a.video[:1000])],
        INVALID,
        "the upload ended after 1000 of the [0-9]+ bytes the header declared",
    ),
    Case(
        "video-random-bytes",
        "video",
        lambda a: upload(np.random.default_rng(1).bytes(50_000)),
        INVALID,
        "cannot open video: Invalid data",
    ),
    Case("video-truncated", "video", lambda a: upload(a.video[: len(a.video) // 2]), INVALID, "cannot open video"),
    Case("video-corrupt-frames", "video", lambda a: upload(garbled(a.video)), INVALID, "corrupt video after 0 frames"),
    Case("video-a-still-image", "video", lambda a: upload(chelsea()), INVALID, "a still image"),
    Case("video-header-only", "video", lambda a: [header()], INVALID, "no video: neither a path nor any chunk"),
    Case(
        "video-no-header",
        "video",
        lambda a: [pb.IndexVideoRequest(chunk=a.video)],
        INVALID,
        "first message must be the video header",
    ),
    Case("video-no-messages", "video", lambda a: [], INVALID, "first message must be the video header"),
    Case("video-two-headers", "video", lambda a: [header(), header()], INVALID, "only chunks may follow the header"),
    Case("video-empty-id", "video", lambda a: upload(a.video, video_id=""), INVALID, "id is empty"),
    Case(
        "video-scene-threshold-0",
        "video",
        lambda a: [header(scene_threshold=0.0)],
        INVALID,
        "scene threshold must be in",
    ),
    Case(
        "video-min-over-max",
        "video",
        lambda a: [header(min_interval_s=5, max_interval_s=1)],
        INVALID,
        "min interval <= max interval",
    ),
    Case(
        "video-nan-interval",
        "video",
        lambda a: [header(max_interval_s=float("nan"))],
        INVALID,
        "intervals must be numbers",
    ),
    Case("video-path-dotdot", "video", lambda a: [header(path="../outside.mp4")], DENIED, "outside the media root"),
    Case("video-path-absolute", "video", lambda a: [header(path="/etc/passwd")], DENIED, "outside the media root"),
    Case("video-path-symlink-out", "video", lambda a: [header(path="link.mp4")], DENIED, "outside the media root"),
    Case("video-path-nul", "video", lambda a: [header(path="clip.mp4\x00.jpg")], DENIED, "invalid media path"),
    Case(
        "video-path-huge",
        "video",
        lambda a: [header(path="p" * 900_000)],
        NOT_FOUND,
        "no such file under the media root",
    ),
    Case(
        "video-path-missing",
        "video",
        lambda a: [header(path="missing.mp4")],
        NOT_FOUND,
        "no such file under the media root",
    ),
]


def call(stub: pb_grpc.InstanceSearchStub, case: Case, assets: Assets) -> tuple[grpc.StatusCode, str, list]:
    request = case.request(assets)
    try:
        if case.rpc == "index":
            responses = list(stub.IndexImages(iter([request]), timeout=120))
        elif case.rpc == "search":
            responses = list(stub.Search(request, timeout=120))
        elif case.rpc == "video":
            responses = list(stub.IndexVideo(iter(request), timeout=120))
        else:
            responses = [stub.Delete(request, timeout=120)]
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", []
    return OK, "", responses


def state(client: InstanceSearchClient) -> tuple:
    """What the index holds: counts per space and a search's ranked ids, scores and boxes."""
    stats = client.stats()
    hits = client.search(encode(photo("coffee")), top_k=10)
    regions = client.search(encode(photo("chelsea")), box=(100, 30, 330, 290), top_k=10, recipe="dasr_star")
    return (
        (stats.images, stats.regions, stats.videos, stats.keyframes),
        sorted((s.recipe, s.kind, s.vectors, s.dim, s.whitening_version) for s in stats.indexes),
        [(h.id, round(h.score, 5)) for h in hits],
        [(h.id, round(h.score, 5), round(h.box.x1), round(h.box.y2)) for h in regions],
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    root = tmp_path_factory.mktemp("sweep")
    media = root / "media"
    media.mkdir()
    clip = scenes_video(media / "clip.mp4", [data.astronaut(), data.coffee()], seconds_each=1)
    (root / "outside.mp4").write_bytes(clip.read_bytes())
    os.symlink(root / "outside.mp4", media / "link.mp4")
    return Assets(media, clip.read_bytes())


@pytest.fixture(scope="module")
def server(models_dir: Path, assets: Assets, tmp_path_factory: pytest.TempPathFactory):
    flags = ["--recipe", "gem,dasr_star", "--max-message-mb", "1", "--max-pixels", "1000000"]
    flags += ["--max-video-mb", "1", "--media-root", str(assets.media)]
    with running_server(models_dir, tmp_path_factory.mktemp("sweep-data"), *flags) as running:
        with InstanceSearchClient(running.address, timeout=120) as client:
            client.wait_ready()
            list(client.index_images(ImageItem(name, encode(photo(name))) for name in INDEXED))
        yield running


@pytest.fixture(scope="module")
def channel(server):
    """A channel that sends more than the server takes, so oversize messages reach it."""
    options = [("grpc.max_send_message_length", 8 * MAX_MESSAGE), ("grpc.max_receive_message_length", 8 * MAX_MESSAGE)]
    with grpc.insecure_channel(server.address, options=options) as opened:
        yield opened


@pytest.fixture(scope="module")
def before(server) -> tuple:
    with InstanceSearchClient(server.address, timeout=120) as client:
        return state(client)


def test_the_sweep_holds_at_least_fifty_bad_inputs() -> None:
    assert len([case for case in CASES if case.code != OK]) >= 50
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gets_the_fitting_code_and_says_why(before, channel, assets: Assets, case: Case) -> None:
    code, details, responses = call(pb_grpc.InstanceSearchStub(channel), case, assets)
    assert code == case.code, f"{case.name}: {code.name} {details!r}"
    assert re.search(case.message, details), f"{case.name}: {details!r} does not say {case.message!r}"
    if case.hits is not None:
        assert len(responses) == case.hits
    if case.name == "delete-unknown-id-reports-it":
        assert (responses[0].deleted, list(responses[0].missing)) == (0, ["never-indexed"])


def test_bad_queries_on_one_stream_get_their_own_errors_and_the_stream_goes_on(before, channel) -> None:
    queries = [
        image_request(b"not an image"),
        image_request(chelsea()),
        image_request(chelsea(), recipe="nope"),
        image_request(chelsea(), box=box(0, 0, float("nan"), 5)),
        image_request(chelsea(), top_k=3),
    ]
    stub = pb_grpc.InstanceSearchStub(channel)
    responses = list(stub.SearchStream((pb.SearchStreamRequest(query=q, tag=str(i)) for i, q in enumerate(queries))))
    assert [r.tag for r in responses] == ["0", "1", "2", "3", "4"]
    assert [r.error_code for r in responses] == [INVALID.value[0], 0, INVALID.value[0], INVALID.value[0], 0]
    assert "not an image in a supported format" in responses[0].error
    assert "unknown recipe 'nope'" in responses[2].error and "non-finite" in responses[3].error
    assert len(responses[1].hits) == 4 and len(responses[4].hits) == 3


def string_field(number: int, value: bytes) -> bytes:
    """Wire bytes of one length-delimited field (a string), whatever bytes it holds."""
    return bytes([number << 3 | 2, len(value)]) + value


NOT_UTF8 = b"\xff\xfe"
MALFORMED = {"truncated": b"\x0a\xff\x01abc", "bad-wire-type": b"\x0f\x00"}  # 255 bytes declared, 3 held; type 7
MALFORMED_CALLS = [  # method, request and response streaming, a string field that is not UTF-8 (None: none)
    ("/inserve.v1.InstanceSearch/Search", False, False, string_field(4, NOT_UTF8)),  # recipe
    ("/inserve.v1.InstanceSearch/IndexImages", True, True, string_field(1, NOT_UTF8)),  # id
    ("/inserve.v1.InstanceSearch/SearchStream", True, True, string_field(2, NOT_UTF8)),  # tag
    ("/inserve.v1.InstanceSearch/IndexVideo", True, True, string_field(1, string_field(1, NOT_UTF8))),  # video id
    ("/inserve.v1.InstanceSearch/Delete", False, False, string_field(1, NOT_UTF8)),  # ids
    ("/inserve.v1.InstanceSearch/GetStats", False, False, None),
]


MALFORMED_CASES = [
    pytest.param(name, rs, ps, payload, id=f"{kind}-{name.rsplit('/', 1)[1]}")
    for name, rs, ps, not_utf8 in MALFORMED_CALLS
    for kind, payload in [*MALFORMED.items(), ("invalid-utf8", not_utf8)]
    if payload is not None
]


@pytest.mark.parametrize(("name", "request_streaming", "response_streaming", "payload"), MALFORMED_CASES)
def test_malformed_messages_are_invalid_argument_with_a_plain_message(
    before, channel, name: str, request_streaming: bool, response_streaming: bool, payload: bytes
) -> None:
    shape = ("stream" if request_streaming else "unary") + "_" + ("stream" if response_streaming else "unary")
    call = getattr(channel, shape)(name)  # no serialisers: the bytes go as they are
    with pytest.raises(grpc.RpcError) as caught:
        answer = call(iter([payload]) if request_streaming else payload, timeout=60)
        if response_streaming:
            list(answer)
    assert caught.value.code() == INVALID, caught.value.details()
    assert re.match(r"malformed inserve\.v1\.\w+ \(\d+ bytes\): not a valid message", caught.value.details())


def test_after_the_sweep_the_server_serves_the_same_index(server, before: tuple) -> None:
    with InstanceSearchClient(server.address, timeout=120) as client:
        assert state(client) == before
    assert before[0][0] == len(INDEXED) and before[2][0][0] == "coffee"
    assert server.process.poll() is None
    log = "".join(server.output)
    assert "Traceback" not in log and "UNKNOWN" not in log, log[-3000:]
