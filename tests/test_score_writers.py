"""Scoring output storage: atomic parts, finalisation to Parquet/CSV/JSONL, resume bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from patchflannel.errors import ConfigError
from patchflannel.scoring.writers import META_KEY, ResultStore, output_format, output_schema, read_output

SCHEMA = output_schema(["resnet18_patch"], ["label"])
RUN_KEY = {"bundle_id": "abc", "seed": 0, "k": 4, "precision": "fp32", "backend": "torch"}


def _row(i: int, **over: object) -> dict[str, object]:
    p = [0.1 + i / 1000, 0.2, 0.3, 0.4 - i / 1000]
    row: dict[str, object] = {
        "path": f"/data/img,{i}.png", "label": "covid", "content_hash": f"h{i}", "status": "ok", "error": None,
        "flags": "", "pred": "normal", "k": 4, "seed": 0, "bundle_id": "abc", "backend": "torch",
        **{f"p_{c}": v for c, v in zip(("covid", "viral", "bacterial", "normal"), p)},
        **{f"resnet18_patch_{c}": v for c, v in zip(("covid", "viral", "bacterial", "normal"), (0.25, 0.5, 0.0, 0.25))},
    }
    row.update(over)
    return row


def _error_row(i: int) -> dict[str, object]:
    return {"path": f"/data/bad{i}.png", "label": "", "content_hash": f"e{i}", "status": "error",
            "error": f'/data/bad{i}.png: cannot decode PNG: "truncated", naïve', "flags": "", "k": 4, "seed": 0,
            "bundle_id": "abc", "backend": "torch"}


def _full_rows() -> list[dict[str, object]]:
    return [{name: r.get(name) for name in SCHEMA.names} for r in (_row(0), _error_row(1), _row(2), _row(3))]


def test_output_format_by_extension(tmp_path: Path) -> None:
    assert [output_format(tmp_path / f"x{e}") for e in (".parquet", ".CSV", ".jsonl")] == ["parquet", "csv", "jsonl"]
    with pytest.raises(ConfigError, match=r"x\.txt: unknown output extension '\.txt'"):
        output_format(tmp_path / "x.txt")


def test_schema_columns() -> None:
    assert SCHEMA.names[:3] == ["path", "label", "content_hash"]
    assert "resnet18_patch_bacterial" in SCHEMA.names and "sop_instance_uid" in SCHEMA.names


@pytest.mark.parametrize("ext", [".parquet", ".csv", ".jsonl"])
def test_parts_finalised_to_each_format_with_the_same_rows(tmp_path: Path, ext: str) -> None:
    store = ResultStore(tmp_path / f"out{ext}", SCHEMA)
    store.begin(RUN_KEY, resume=False)
    rows = _full_rows()
    store.write_chunk(rows[:3])
    store.write_chunk(rows[3:])
    assert sorted(p.name for p in store.parts_dir.iterdir()) == ["part-000000.parquet", "part-000001.parquet", "run.json"]
    assert store.finalize({"bundle": {"id": "abc"}}) == {"ok": 3, "error": 1}
    assert not store.parts_dir.exists()
    table, meta = read_output(store.out)
    assert table.schema.remove_metadata().equals(SCHEMA)
    assert table.to_pylist() == rows  # exact floats, None vs "" kept, quotes/commas/unicode kept
    assert meta["bundle"] == {"id": "abc"} and meta["run_key"] == {**RUN_KEY, "columns": SCHEMA.names}
    if ext == ".parquet":
        assert json.loads(pq.read_schema(store.out).metadata[META_KEY]) == {k: v for k, v in meta.items() if k != "counts"}


def test_existing_output_refused_without_resume(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "out.parquet", SCHEMA)
    store.begin(RUN_KEY, resume=False)
    store.write_chunk(_full_rows()[:1])  # an unfinished run
    with pytest.raises(ConfigError, match="already exists; pass --resume"):
        ResultStore(tmp_path / "out.parquet", SCHEMA).begin(RUN_KEY, resume=False)
    store.clear()
    ResultStore(tmp_path / "out.parquet", SCHEMA).begin(RUN_KEY, resume=False)


def _resumed(out: Path, rows: list[dict]) -> ResultStore:
    """A store resuming a finished run of ``rows[:2]`` into ``out``, with ``rows[2]`` written since."""
    first = ResultStore(out, SCHEMA)
    first.begin(RUN_KEY, resume=False)
    first.write_chunk(rows[:2])
    first.finalize({})
    second = ResultStore(out, SCHEMA)
    second.begin(RUN_KEY, resume=True)
    second.write_chunk(rows[2:3])
    return second


def test_resume_keys_from_parts_and_output_and_dedup(tmp_path: Path) -> None:
    rows = _full_rows()
    out = tmp_path / "out.csv"
    second = _resumed(out, rows)
    (second.parts_dir / "part-000009.parquet.tmp").write_bytes(b"half a file")  # a killed write: ignored
    assert second.scored_keys() == {("/data/img,0.png", "h0"), ("/data/bad1.png", "e1"), ("/data/img,2.png", "h2")}
    second.write_chunk(rows[1:2] + rows[3:])  # a duplicate of a stored row is kept once
    assert second.finalize({}) == {"ok": 3, "error": 1}
    assert read_output(out)[0].to_pylist() == rows


def test_resume_without_the_sidecar_uses_the_unfinished_runs_key(tmp_path: Path) -> None:
    """Stopped while finishing (the output written, its sidecar not): a resume still knows the run."""
    rows = _full_rows()
    out = tmp_path / "out.parquet"
    _resumed(out, rows).meta_path.unlink()
    third = ResultStore(out, SCHEMA)
    third.begin(RUN_KEY, resume=True)
    third.write_chunk(rows[3:])
    assert third.finalize({}) == {"ok": 3, "error": 1} and third.meta_path.is_file()
    assert read_output(out)[0].to_pylist() == rows


def test_a_second_run_into_the_same_output_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    first = ResultStore(out, SCHEMA)
    first.lock()
    first.begin(RUN_KEY, resume=False)
    first.write_chunk(_full_rows()[:1])
    with pytest.raises(ConfigError, match="another scoring run is writing it"):
        ResultStore(out, SCHEMA).lock()
    first.finalize({})
    assert not first.lock_path.exists()
    again = ResultStore(out, SCHEMA)
    again.lock()  # free once the first run is done
    again.begin(RUN_KEY, resume=True)
    assert again.finalize({}) == {"ok": 1}


def test_finalize_keep_drops_rows_of_changed_files(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "out.jsonl", SCHEMA)
    store.begin(RUN_KEY, resume=False)
    store.write_chunk(_full_rows())
    keep = {("/data/img,0.png", "h0"), ("/data/img,3.png", "h3")}
    assert store.finalize({}, keep=keep.__contains__) == {"ok": 2}
    assert [r["path"] for r in read_output(store.out)[0].to_pylist()] == ["/data/img,0.png", "/data/img,3.png"]


def test_resume_refuses_another_run_key_or_schema(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    store = ResultStore(out, SCHEMA)
    store.begin(RUN_KEY, resume=False)
    store.write_chunk(_full_rows())
    with pytest.raises(ConfigError, match=r"different seed \(seed 0 there, 1 now\)"):
        ResultStore(out, SCHEMA).begin({**RUN_KEY, "seed": 1}, resume=True)
    store.finalize({})
    with pytest.raises(ConfigError, match=r"different bundle_id, k \(bundle_id abc there, other now; k 4 there, 8 now\)"):
        ResultStore(out, SCHEMA).begin({**RUN_KEY, "bundle_id": "other", "k": 8}, resume=True)
    with pytest.raises(ConfigError, match=r"different columns \(columns: vgg19_bn_patch_covid, .* only now; resnet18_patch_covid, .* only there"):
        ResultStore(out, output_schema(["vgg19_bn_patch"], ["label"])).begin(RUN_KEY, resume=True)
    with pytest.raises(ConfigError, match=r"different precision \(precision fp32 there, bf16 now\)"):
        ResultStore(out, SCHEMA).begin({**RUN_KEY, "precision": "bf16"}, resume=True)
    store.meta_path.unlink()
    with pytest.raises(ConfigError, match="metadata .*meta.json is missing"):
        ResultStore(out, SCHEMA).begin(RUN_KEY, resume=True)
    older = ResultStore(tmp_path / "older.parquet", SCHEMA)  # made before precision and backend were recorded
    older.begin({k: v for k, v in RUN_KEY.items() if k not in ("precision", "backend")}, resume=False)
    older.write_chunk(_full_rows())
    older.finalize({})
    ResultStore(older.out, SCHEMA).begin(RUN_KEY, resume=True)  # resumes on what it recorded
    with pytest.raises(ConfigError, match=r"different precision .*--precision and --backend pin them"):
        ResultStore(older.out, SCHEMA).begin({**RUN_KEY, "precision": "bf16"}, resume=True)  # now it is recorded


def test_a_csv_output_with_newlines_in_paths_reads_back_across_blocks(tmp_path: Path) -> None:
    """Quoted newlines may fall on a boundary of the CSV reader's 1 MiB blocks: read with that in mind."""
    rows = [{name: None for name in SCHEMA.names} | {"path": f"/data/line\nbreak {i}.png", "content_hash": f"{i:064d}",
                                                       "status": "ok", "flags": "", "k": 4, "seed": 0}
            for i in range(20_000)]
    store = ResultStore(tmp_path / "out.csv", SCHEMA)
    store.begin(RUN_KEY, resume=False)
    store.write_chunk(rows)
    store.finalize({})
    assert (tmp_path / "out.csv").stat().st_size > 2 << 20  # several blocks
    assert read_output(tmp_path / "out.csv")[0].column("path").to_pylist() == [r["path"] for r in rows]


def test_an_interrupt_writes_the_rows_taken_since_the_last_chunk(tmp_path: Path) -> None:
    from patchflannel.scoring.run import chunks

    def rows():  # as the engine's stream when Ctrl-C arrives while it scores the fourth input
        yield from _full_rows()[:3]
        raise KeyboardInterrupt

    store = ResultStore(tmp_path / "out.parquet", SCHEMA)
    store.begin(RUN_KEY, resume=False)
    with pytest.raises(KeyboardInterrupt):
        for chunk in chunks(rows(), 2, store):
            store.write_chunk(chunk)
    parts = sorted(store.parts_dir.glob("part-*.parquet"))
    assert [pq.read_table(p).num_rows for p in parts] == [2, 1]
    resumed = ResultStore(tmp_path / "out.parquet", SCHEMA)
    resumed.begin(RUN_KEY, resume=True)
    assert len(resumed.scored_keys()) == 3


def test_a_write_cut_short_leaves_no_temporary_file_and_an_interrupt_still_writes_the_part(tmp_path: Path,
                                                                                          monkeypatch) -> None:
    """A part write that fails half-way (a full disk) leaves no half file, and the next part takes its number;
    Ctrl-C half-way through a write makes the chunk be written whole first, then the interrupt goes on; a
    resumed run finds every row once."""
    from patchflannel.scoring import writers
    from patchflannel.scoring.run import write_whole

    real = writers.pq.write_table
    failures: list[BaseException] = [OSError(28, "No space left on device"), KeyboardInterrupt()]
    calls: list[str] = []

    def cut_short(table, where, *args, **kwargs):
        calls.append(str(where))
        if failures:
            Path(where).write_bytes(b"PAR1 half a file")
            raise failures.pop(0)
        return real(table, where, *args, **kwargs)

    store = ResultStore(tmp_path / "out.parquet", SCHEMA)
    store.begin(RUN_KEY, resume=False)
    write_whole(store, _full_rows()[:2])  # part 0
    monkeypatch.setattr(writers.pq, "write_table", cut_short)
    with pytest.raises(OSError, match="No space"):
        write_whole(store, _full_rows()[2:])
    assert sorted(p.name for p in store.parts_dir.glob("part-*")) == ["part-000000.parquet"]  # no .tmp
    with pytest.raises(KeyboardInterrupt):
        write_whole(store, _full_rows()[2:])
    assert len(set(calls)) == 1  # part number 1 each time
    assert sorted(p.name for p in store.parts_dir.glob("part-*")) == ["part-000000.parquet", "part-000001.parquet"]
    assert pq.read_table(store.parts_dir / "part-000001.parquet").num_rows == len(_full_rows()) - 2
    resumed = ResultStore(tmp_path / "out.parquet", SCHEMA)
    resumed.begin(RUN_KEY, resume=True)
    assert len(resumed.scored_keys()) == len(_full_rows())
