"""Scoring on a local Ray instance (CPU, 2 actors) gives the same rows as the local run, on real images."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import typer
from test_score import K, mixed_bundle, real_images
from typer.testing import CliRunner

from patchflannel.cli.score import register
from patchflannel.scoring.run import EngineOptions, score
from patchflannel.scoring.writers import read_output

ray = pytest.importorskip("ray", reason="Ray (the patchflannel[ray] extra) is not installed")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_run_equals_local_run(local_ray: None, cxr4_dir: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = str(mixed_bundle(tmp_path / "bundle"))
    images = tmp_path / "images"
    images.mkdir()
    for p in real_images(cxr4_dir, 3):
        shutil.copy(p, images / p.name)
    (images / "zero.jpg").write_bytes(b"")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"images/{p.name},{p.parent.name}\n" for p in sorted(images.iterdir())))
    options = EngineOptions(bundle=bundle, k=K)

    # Each Ray actor has one CPU, so one torch thread; CPU convolutions may round differently with another
    # thread count (docs/scoring.md), so the local run uses one thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = score([manifest], tmp_path / "local.parquet", options=options, quiet=True)
    finally:
        torch.set_num_threads(threads)
    on_ray = score([manifest], tmp_path / "ray.csv", ray=True, actors=2, options=options, ray_batch_size=1,
                   chunk_size=2, quiet=True)
    assert (local.rows, local.errors) == (on_ray.rows, on_ray.errors) == (4, 1)
    app = typer.Typer()
    register(app)
    monkeypatch.chdir(tmp_path)  # a relative bundle path: the actors work in Ray's own working directory
    cli = CliRunner().invoke(app, ["score", str(manifest), "--out", str(tmp_path / "cli.jsonl"), "--bundle", "bundle",
                                   "-k", str(K), "--ray", "--actors", "2", "--chunk-size", "3"])
    assert cli.exit_code == 1 and "4 rows: 3 ok, 0 flagged, 1 errors" in cli.output, cli.output
    local_rows, _ = read_output(tmp_path / "local.parquet")
    ray_rows, meta = read_output(tmp_path / "ray.csv")
    by_path = {r["path"]: r for r in ray_rows.to_pylist()}
    assert local_rows.column_names == ray_rows.column_names
    assert {r["path"]: r for r in local_rows.to_pylist()} == by_path  # bit-identical values
    assert {r["path"]: r for r in read_output(tmp_path / "cli.jsonl")[0].to_pylist()} == by_path
    assert len({r["p_covid"] for r in by_path.values() if r["status"] == "ok"}) == 3
    assert meta["engine"]["ray"]["actors"] == 2
    engines = meta["engine"]["engines"]  # one entry per actor that scored something
    assert 1 <= len(engines) <= 2 and {(e["device"], e["torch_threads"]) for e in engines} == {("cpu", 1)}
