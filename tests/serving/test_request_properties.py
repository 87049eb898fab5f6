"""Property tests of request validation, in-process on the real models: whatever a client puts in a search
request's fields, an image id or a video header's keyframe options, the request is accepted with values
that make sense or refused with one of the errors the servicer turns into a status code."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from photos import encode, photo

from inserve.server.config import ServerConfig, VideoConfig
from inserve.server.errors import REQUEST_ERRORS
from inserve.server.grouping import GROUPINGS
from inserve.server.grpc.messages import search_options, selection_rules
from inserve.server.ids import KEYFRAME_SEPARATOR, MAX_ID_LENGTH, check_id
from inserve.server.instance_search import InstanceSearch
from inserve.server.pipeline import QueryJob
from inserve.v1 import inserve_pb2 as pb

RECIPES = ("dasr_star", "gem")
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
UINT32 = st.integers(0, 2**32 - 1)
FLOAT32 = st.floats(allow_nan=True, allow_infinity=True, width=32)


@pytest.fixture(scope="module")
def core(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    config = ServerConfig(data_dir=tmp_path_factory.mktemp("props"), models=models_dir, recipes=RECIPES)
    service = InstanceSearch(config)
    yield service
    service.close()


@pytest.fixture(scope="module")
def query_input(core: InstanceSearch):
    return core.load(encode(photo("chelsea")))


def boxes() -> st.SearchStrategy[pb.Box | None]:
    return st.none() | st.builds(pb.Box, x1=FLOAT32, y1=FLOAT32, x2=FLOAT32, y2=FLOAT32)


@SETTINGS
@given(
    recipe=st.sampled_from(("", *RECIPES)) | st.text(max_size=40),
    top_k=UINT32,
    query_expansion=UINT32,
    group=st.integers(-(2**31), 2**31 - 1),
    box=boxes(),
)
def test_search_requests_are_valid_or_refused(
    core: InstanceSearch, query_input, recipe: str, top_k: int, query_expansion: int, group: int, box
) -> None:
    """The steps Search runs before the networks (servicer._search), on any field values."""
    request = pb.SearchRequest(recipe=recipe, top_k=top_k, options=pb.SearchOptions(query_expansion=query_expansion))
    request.options.group = group  # proto3 enums are open: any int32 arrives
    if box is not None:
        request.box.CopyFrom(box)
    try:
        plan = core.plan(request.recipe, request.top_k, search_options(request.options))
        coordinates = (box.x1, box.y1, box.x2, box.y2) if box is not None else None
        job = core.pipeline.query_job(query_input, coordinates, plan.recipe)
    except REQUEST_ERRORS as exc:
        assert str(exc)
        return
    assert plan.recipe in RECIPES and plan.recipe == (recipe or RECIPES[0])
    assert 1 <= plan.top_k <= core.config.max_top_k
    options = plan.options
    assert options.group in GROUPINGS and 0 <= options.query_expansion <= core.config.max_top_k
    assert isinstance(job, QueryJob)
    if job.box is not None:
        x1, y1, x2, y2 = (float(v) for v in job.box)
        height, width = query_input.pixels.shape[1:]
        assert all(math.isfinite(v) for v in (x1, y1, x2, y2))
        assert 0 <= x1 < x2 <= width + 1e-3 and 0 <= y1 < y2 <= height + 1e-3


@SETTINGS
@given(st.text(max_size=MAX_ID_LENGTH + 40))
def test_ids_are_valid_or_refused(external_id: str) -> None:
    try:
        check_id(external_id)
    except REQUEST_ERRORS as exc:
        assert str(exc)
        return
    assert 0 < len(external_id) <= MAX_ID_LENGTH and KEYFRAME_SEPARATOR not in external_id


@SETTINGS
@given(
    scene_threshold=st.none() | FLOAT32,
    min_interval_s=st.none() | FLOAT32,
    max_interval_s=st.none() | FLOAT32,
    iframes_only=st.none() | st.booleans(),
)
def test_keyframe_options_are_valid_or_refused(scene_threshold, min_interval_s, max_interval_s, iframes_only) -> None:
    given_fields = {
        "scene_threshold": scene_threshold,
        "min_interval_s": min_interval_s,
        "max_interval_s": max_interval_s,
        "iframes_only": iframes_only,
    }
    options = pb.KeyframeOptions(**{name: value for name, value in given_fields.items() if value is not None})
    try:
        rules = selection_rules(VideoConfig(), options)
    except REQUEST_ERRORS as exc:
        assert str(exc)
        return
    assert 0 < rules.scene_threshold <= 1
    assert 0 <= rules.min_interval_s <= rules.max_interval_s and rules.max_interval_s > 0
