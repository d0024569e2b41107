"""`matchlock build`: Dockerfiles built by a real engine (Buildah) inside a builder VM.

`BuildJob(BuildRequest(...), progress, output).run()` builds and imports the image;
`prune_cache()` deletes the persistent build cache; `builder_status()` is what
`diagnose` reports.
"""

from matchlock.build._builder import builder_name, builder_status, ensure_builder
from matchlock.build._cache import prune as prune_cache
from matchlock.build._job import BuildFailed, BuildJob, BuildRequest, BuildResult, check

__all__ = ["BuildFailed", "BuildJob", "BuildRequest", "BuildResult", "builder_name",
           "builder_status", "check", "ensure_builder", "prune_cache"]
