"""Base images named by a Dockerfile (what the host hands to the engine)."""

from __future__ import annotations

from matchlock.build._dockerfile import base_images
from matchlock.build._job import engine_name


def test_stages_scratch_and_args() -> None:
    text = """# syntax comment
ARG BASE=debian:test
ARG TAG
FROM ${BASE} AS build
RUN echo \\
    hi
FROM build AS app
FROM --platform=linux/amd64 busybox:${TAG:-1}
FROM scratch
COPY --from=build /x /x
COPY --from=0 /x /y
COPY --from=alpine:3 /bin/sh /sh
"""
    assert base_images(text, {}) == ["debian:test", "busybox:1", "alpine:3"]
    assert base_images(text, {"BASE": "img:2", "TAG": "9"}) == ["img:2", "busybox:9",
                                                                "alpine:3"]


def test_engine_names_are_fully_qualified() -> None:
    assert engine_name("debian:test") == "docker.io/library/debian:test"
    assert engine_name("localhost:5000/a/b:1") == "localhost:5000/a/b:1"
    assert engine_name("matchlock/busybox") == "docker.io/matchlock/busybox:latest"
