"""`.dockerignore` semantics and the context tar (no VM)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from matchlock.build._context import IgnoreRules, write_tar
from matchlock.errors import UsageError


def names(ctx: Path, rules: list[str]) -> list[str]:
    buf = io.BytesIO()
    write_tar(ctx, buf, IgnoreRules(rules))
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        return sorted(m.name for m in tf.getmembers())


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    for rel in ("a.txt", "b.log", "src/main.py", "src/keep.log", "src/deep/x.log",
                "node_modules/pkg/index.js", ".git/HEAD", "docs/readme.md"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(rel)
    return tmp_path


def test_no_rules_sends_everything(ctx: Path) -> None:
    assert "node_modules/pkg/index.js" in names(ctx, [])
    assert ".git/HEAD" in names(ctx, [])


def test_root_anchored_star_does_not_cross_slash(ctx: Path) -> None:
    got = names(ctx, ["*.log"])
    assert "b.log" not in got
    assert "src/keep.log" in got  # `*.log` is anchored at the root, as in Docker


def test_double_star_and_exception_last_wins(ctx: Path) -> None:
    got = names(ctx, ["**/*.log", "!src/keep.log"])
    assert "b.log" not in got and "src/deep/x.log" not in got
    assert "src/keep.log" in got


def test_directory_rule_covers_its_tree(ctx: Path) -> None:
    got = names(ctx, ["node_modules", ".git", "# comment", "", "  docs/  "])
    assert not any(n.startswith(("node_modules", ".git", "docs")) for n in got)
    assert "src/main.py" in got


def test_exception_inside_excluded_directory(ctx: Path) -> None:
    got = names(ctx, ["src", "!src/main.py"])
    assert "src/main.py" in got and "src/keep.log" not in got


def test_leading_slash_and_dot_cleaned(ctx: Path) -> None:
    assert "a.txt" not in names(ctx, ["/a.txt"])
    assert "a.txt" not in names(ctx, ["./a.txt"])


def test_question_mark_and_class(ctx: Path) -> None:
    got = names(ctx, ["?.txt", "[b].log"])
    assert "a.txt" not in got and "b.log" not in got


def test_owners_are_root_and_links_kept(ctx: Path) -> None:
    os.symlink("a.txt", ctx / "link")
    os.mkfifo(ctx / "fifo")
    buf = io.BytesIO()
    write_tar(ctx, buf, IgnoreRules([]))
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert "fifo" not in members
    assert members["link"].issym() and members["link"].linkname == "a.txt"
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())


def test_load_reads_dockerignore_and_bad_pattern_is_one_line(ctx: Path) -> None:
    (ctx / ".dockerignore").write_text("b.log\n")
    assert IgnoreRules.load(ctx).excluded("b.log")
    (ctx / ".dockerignore").write_text("[oops\n")
    with pytest.raises(UsageError, match=r"\.dockerignore line 1: bad pattern"):
        IgnoreRules.load(ctx)
