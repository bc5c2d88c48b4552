"""A scoring process killed with SIGKILL part-way, then resumed: every input exactly once, nothing lost."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from rich.console import Console

from patchflannel.bundle import random_bundle
from patchflannel.scoring.run import EngineOptions, score
from patchflannel.scoring.writers import read_output

N_IMAGES = 4
CLI = "from patchflannel.cli import app; from patchflannel.cli.score import register; register(app); app()"
"""The CLI app with the score commands (the console script once `score` is registered there)."""


def _scoring_with_a_part(images: Path, out: Path, bundle: Path, chunk_size: int, *more: str) -> subprocess.Popen:
    """A `score` process of ``images`` into ``out`` (``more``: further options), once it has written its first part."""
    args = [sys.executable, "-c", CLI, "score", str(images), "--out", str(out), "--bundle", str(bundle),
            "-k", "2", "--chunk-size", str(chunk_size), "--quiet", *more]
    proc = subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    parts, deadline = out.with_name(out.name + ".parts"), time.monotonic() + 240
    while not list(parts.glob("part-*.parquet")):
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        assert time.monotonic() < deadline, "no part written in time"
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_sigkill_then_resume_scores_each_input_once(cxr4_dir: Path, tmp_path: Path) -> None:
    bundle = random_bundle(tmp_path / "bundle", segmentation="fcdensenet56", learners=("shufflenet_v2_x0_5",)).root
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((cxr4_dir / "images" / "normal").iterdir())[:N_IMAGES]:
        shutil.copy(p, images / p.name)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "scores.csv"
    parts = tmp_path / "scores.csv.parts"
    proc = _scoring_with_a_part(images, out, bundle, chunk_size=1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(parts.glob("part-*.parquet"))
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    assert 1 <= len(done) < N_IMAGES + 1, "the run was not killed part-way"

    summary = score([images], out, options=EngineOptions(bundle=str(bundle), k=2), resume=True, chunk_size=1, quiet=True)
    assert summary.skipped == len(done) and summary.scored_now == N_IMAGES + 1 - len(done)
    assert (summary.rows, summary.ok, summary.errors) == (N_IMAGES + 1, N_IMAGES, 1)
    table, meta = read_output(out)
    paths = table.column("path").to_pylist()
    assert sorted(paths) == sorted(str(p) for p in images.iterdir()) and len(set(paths)) == len(paths)
    assert not parts.exists() and meta["counts"] == {"ok": N_IMAGES, "error": 1}

    # A resume of a finished run scores nothing and keeps the rows; a changed file is scored again.
    again = score([images], out, options=EngineOptions(bundle=str(bundle), k=2), resume=True, quiet=True)
    assert (again.skipped, again.scored_now, again.rows) == (N_IMAGES + 1, 0, N_IMAGES + 1)
    assert read_output(out)[0].to_pylist() == table.to_pylist()
    shutil.copy(cxr4_dir / "images" / "covid" / sorted(os.listdir(cxr4_dir / "images" / "covid"))[0], images / "broken.png")
    log = Console(file=io.StringIO(), width=300)
    fixed = score([images], out, options=EngineOptions(bundle=str(bundle), k=2), resume=True, console=log)
    assert (fixed.scored_now, fixed.rows, fixed.errors) == (1, N_IMAGES + 1, 0)
    assert "resume: 1 stored rows of files changed since are scored again" in log.file.getvalue()
    assert "left out of" not in log.file.getvalue()  # no file was: nothing said of it
    rows = {r["path"]: r for r in read_output(out)[0].to_pylist()}
    assert rows[str(images / "broken.png")]["status"] == "ok" and len(rows) == N_IMAGES + 1


@pytest.mark.slow
@pytest.mark.parametrize(("sigs", "code", "said"), [
    ((signal.SIGINT,), 130, "interrupted"), ((signal.SIGTERM,), 143, "terminated (SIGTERM)"),  # a scheduler's stop
    ((signal.SIGINT, signal.SIGINT), 130, "interrupted"),  # `timeout`'s, to the process and to its group
])
def test_ctrl_c_keeps_the_rows_scored_and_says_how_to_go_on(cxr4_dir: Path, tmp_path: Path, sigs: tuple[int, ...],
                                                            code: int, said: str) -> None:
    """One signal stops the run cleanly; a second while it stops is ignored (it broke the stop: tracebacks of the
    engine's threads, at times an abort of the process)."""
    bundle = random_bundle(tmp_path / "bundle", segmentation="fcdensenet56", learners=("shufflenet_v2_x0_5",)).root
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((cxr4_dir / "images" / "viral").iterdir())[:N_IMAGES + 2]:
        shutil.copy(p, images / p.name)
    out, parts = tmp_path / "scores.parquet", tmp_path / "scores.parquet.parts"
    proc = _scoring_with_a_part(images, out, bundle, chunk_size=2)
    for sig in sigs:
        proc.send_signal(sig)
        time.sleep(0.2)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == code and f"{said}: the rows scored so far are kept" in output, output
    assert "Traceback" not in output and "Exception ignored" not in output, output
    assert "--resume" in output and not out.exists() and not (tmp_path / "scores.parquet.lock").exists()
    kept = sum(pq.read_table(p).num_rows for p in parts.glob("part-*.parquet"))
    summary = score([images], out, options=EngineOptions(bundle=str(bundle), k=2), resume=True, quiet=True)
    assert summary.skipped == kept and summary.rows == N_IMAGES + 2
    paths = read_output(out)[0].column("path").to_pylist()
    assert sorted(paths) == sorted(str(p) for p in images.iterdir())



def _ray_processes() -> set[int]:
    """Process ids of a local Ray instance's own processes (Linux /proc)."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if any(name in cmdline.read_bytes() for name in (b"raylet", b"gcs_server", b"ray::")):
                found.add(int(cmdline.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="reads processes from Linux /proc")
def test_sigterm_stops_a_ray_run_like_a_local_one(cxr4_dir: Path, tmp_path: Path) -> None:
    """`score --ray` stopped by SIGTERM while it scores: exit 143 and the same message (ray.init puts in a handler
    of its own; ours goes back), the parts kept, and the local Ray instance it started gone with it."""
    pytest.importorskip("ray", reason="Ray (the patchflannel[ray] extra) is not installed")
    bundle = random_bundle(tmp_path / "bundle", segmentation="fcdensenet56", learners=("shufflenet_v2_x0_5",)).root
    images = tmp_path / "images"
    images.mkdir()
    viral = sorted((cxr4_dir / "images" / "viral").iterdir())
    for i in range(48):  # three of Ray's blocks of 16: the first part is written while the rest are scored
        shutil.copy(viral[i % len(viral)], images / f"{i:02d}{viral[i % len(viral)].suffix}")
    out, parts = tmp_path / "scores.parquet", tmp_path / "scores.parquet.parts"
    before = _ray_processes()
    proc = _scoring_with_a_part(images, out, bundle, 2, "--ray", "--actors", "1")
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 143 and "terminated (SIGTERM): the rows scored so far are kept" in output, output
    kept = sum(pq.read_table(p).num_rows for p in parts.glob("part-*.parquet"))
    assert not out.exists() and 0 < kept < 48, kept
    deadline = time.monotonic() + 30
    while _ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes() - before
