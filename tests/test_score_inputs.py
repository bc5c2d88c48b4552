"""Input discovery for scoring: files, folders, globs, manifests; order, duplicates, what is taken."""

from __future__ import annotations

import csv
import glob
import os
import shutil
from pathlib import Path

import pytest

from patchflannel.errors import ConfigError, ManifestError
from patchflannel.io.files import glob_paths, walk_files
from patchflannel.scoring.inputs import discover_inputs, extra_columns, read_score_manifest


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _dicom_bytes() -> bytes:
    return b"\0" * 128 + b"DICM" + b"\0" * 16


def test_folder_is_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    for rel in ("b.png", "a/z.JPG", "a/y.tif", "c.dcm", "notes.txt", "README", ".hidden.png", ".git/x.png", "d.jpeg"):
        _touch(tmp_path / rel)
    _touch(tmp_path / "IM0001", _dicom_bytes())  # extension-less DICOM is taken, "README" is not
    _touch(tmp_path / "1.2.826.0.1.3680043.8.498.1234", _dicom_bytes())  # named by UID: taken too
    _touch(tmp_path / "1.2.826.0.1.3680043.8.498.99", b"not dicom")
    _touch(tmp_path / "DICOMDIR", _dicom_bytes())  # a media export's index: not an image, not taken
    os.mkfifo(tmp_path / "pipe")  # never opened: reading it would block the run
    os.mkfifo(tmp_path / "pipe.png")
    found = [Path(i.path).relative_to(tmp_path).as_posix() for i in discover_inputs([tmp_path])]
    assert found == ["1.2.826.0.1.3680043.8.498.1234", "IM0001", "a/y.tif", "a/z.JPG", "b.png", "c.dcm", "d.jpeg"]
    assert all(os.path.isabs(i.path) for i in discover_inputs([tmp_path]))
    assert [i.path for i in discover_inputs(str(tmp_path / "b.png"))] == [str(tmp_path / "b.png")]  # one source
    assert len(discover_inputs(tmp_path)) == len(found)


def test_named_file_taken_whatever_its_name_and_order_kept(tmp_path: Path) -> None:
    a, b = _touch(tmp_path / "scan.bin"), _touch(tmp_path / "x.png")
    found = discover_inputs([b, a])
    assert [i.path for i in found] == [str(b), str(a)]


def test_duplicates_removed_first_place_kept(tmp_path: Path) -> None:
    a = _touch(tmp_path / "d" / "a.png")
    b = _touch(tmp_path / "d" / "b.png")
    (tmp_path / "link.png").symlink_to(b)
    found = discover_inputs([b, tmp_path / "d", str(tmp_path / "d" / "*.png"), tmp_path / "link.png"])
    assert [i.path for i in found] == [str(b), str(a)]


def test_glob_patterns_recurse_and_filter(tmp_path: Path) -> None:
    _touch(tmp_path / "one" / "a.png")
    _touch(tmp_path / "one" / "two" / "b.jpg")
    _touch(tmp_path / "one" / "two" / "c.txt")
    found = discover_inputs([str(tmp_path / "one" / "**" / "*")])
    assert [Path(i.path).name for i in found] == ["a.png", "b.jpg"]


def test_glob_patterns_match_as_python_glob_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for rel in ("a.png", "s/b.png", "s/.c.png", ".h/d.png", "s/.h/e.png", "s/t/u/f.png", "s[1]/g.png", "x.txt"):
        _touch(tmp_path / rel)
    os.symlink(tmp_path / "s" / "t", tmp_path / "linked")  # a linked folder, no loop: followed, as glob does
    monkeypatch.chdir(tmp_path)
    for pattern in ("**/*.png", "**", "s/**/*.png", "*/**/f.png", "**/.h/*.png", "**/.*.png", "s/**", "s[[]1]/**/*",
                    f"{tmp_path}/**/u/*.png", "**/t/**/*.png", "s/*/**/*.png", "a.png", "none/**/*.png"):
        assert sorted(glob_paths(pattern)) == sorted(glob.glob(pattern, recursive=True)), pattern


def test_glob_patterns_do_not_follow_links_round_a_loop(tmp_path: Path) -> None:
    """Python's glob follows a link back up the tree until the path is too long: with two such links it never
    ends (2 ** 40 paths)."""
    _touch(tmp_path / "d" / "a.png")
    _touch(tmp_path / "d" / "sub" / "b.png")
    os.symlink("..", tmp_path / "d" / "sub" / "up")
    os.symlink("../sub", tmp_path / "d" / "sub" / "self")
    found = discover_inputs([str(tmp_path / "d" / "**" / "*.png")])
    assert [Path(i.path).relative_to(tmp_path / "d").as_posix() for i in found] == ["a.png", "sub/b.png"]


def test_manifest_relative_paths_and_carried_columns(tmp_path: Path) -> None:
    _touch(tmp_path / "imgs" / "a.jpg")
    man = tmp_path / "m.csv"
    man.write_text("path,label,patient_id,license,source\nimgs/a.jpg,covid,p1,CC,src\nimgs/missing.jpg,normal,p2,CC,src\n")
    found = discover_inputs([man])
    assert [i.path for i in found] == [str(tmp_path / "imgs" / "a.jpg"), str(tmp_path / "imgs" / "missing.jpg")]
    assert found[0].extra == {"label": "covid", "patient_id": "p1", "source": "src"}
    assert extra_columns(found) == ["label", "patient_id", "source"]


def test_a_file_listed_twice_with_other_labels_is_refused(tmp_path: Path) -> None:
    _touch(tmp_path / "a.jpg")
    (tmp_path / "same.csv").write_text("path,label\na.jpg,covid\na.jpg,covid\n")
    assert len(discover_inputs(tmp_path / "same.csv")) == 1  # an exact repeat is scored once
    (tmp_path / "m.csv").write_text("path,label\na.jpg,covid\na.jpg,normal\n")
    with pytest.raises(ManifestError, match=r"(?s)m.csv: \S*a.jpg is listed twice with different label "
                                            r"\('covid' vs 'normal'\)$"):
        discover_inputs(tmp_path / "m.csv")
    (tmp_path / "other.csv").write_text("path,label\na.jpg,viral\n")  # two manifests disagreeing: both named
    with pytest.raises(ManifestError, match=r"(?s)other.csv: .*\('covid' vs 'viral'\) \(first in .*same.csv\)"):
        discover_inputs([tmp_path / "same.csv", tmp_path / "other.csv"])


def test_folder_copy_takes_the_manifest_columns_and_pipes_named_are_refused(tmp_path: Path) -> None:
    _touch(tmp_path / "f" / "a.png")
    (tmp_path / "m.csv").write_text("path,label\nf/a.png,viral\n")
    (found,) = discover_inputs([tmp_path / "f", tmp_path / "m.csv"])
    assert found.path == str(tmp_path / "f" / "a.png") and found.extra == {"label": "viral"}
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ConfigError, match="pipe.png: not a regular file"):
        discover_inputs(tmp_path / "pipe.png")


def test_mixed_manifest_and_folder_share_columns(tmp_path: Path) -> None:
    _touch(tmp_path / "m" / "a.png")
    _touch(tmp_path / "f" / "b.png")
    man = tmp_path / "m.csv"
    man.write_text("path,label\nm/a.png,viral\n")
    found = discover_inputs([man, tmp_path / "f"])
    assert [i.extra for i in found] == [{"label": "viral"}, {"label": ""}]


def test_real_cxr4_manifest(cxr4_dir: Path) -> None:
    found = discover_inputs([cxr4_dir / "manifest.csv"])
    with open(cxr4_dir / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(found) == len(rows) == 1178
    assert all(os.path.isfile(i.path) for i in found)
    assert {i.extra["label"] for i in found} == {"covid", "viral", "bacterial", "normal"}
    assert found[5].extra["patient_id"] == rows[5]["patient_id"]


@pytest.mark.parametrize(
    "text, reason",
    [("file,label\na.png,covid\n", "no 'path' column"), ("path,label\n,covid\n", "line 2: empty path"),
     ("path,label\n\na.png,covid\n\n,covid\n", "line 5: empty path"),  # blank lines counted
     ("path,label\na.png,covid,EXTRA\nb.png\n", "(?s)line 2: expected 2 fields, found 3.*line 3: expected 2 fields, found 1")],
)
def test_bad_manifest_names_file_and_reason(tmp_path: Path, text: str, reason: str) -> None:
    man = tmp_path / "bad.csv"
    man.write_text(text)
    with pytest.raises(ManifestError, match=reason) as info:
        read_score_manifest(man)
    assert str(man) in str(info.value)


def test_a_manifest_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a byte-order mark."""
    _touch(tmp_path / "a.png")
    (tmp_path / "m.csv").write_bytes("path,label\na.png,covid\n".encode("utf-8-sig"))
    (found,) = read_score_manifest(tmp_path / "m.csv")
    assert found.path == str(tmp_path / "a.png") and found.extra == {"label": "covid"}


def test_sources_that_name_nothing_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file or folder"):
        discover_inputs([tmp_path / "absent"])
    with pytest.raises(ConfigError, match="^'': an empty path names no file or folder$"):  # was ": no such file"
        discover_inputs([""])
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "gone.png").symlink_to(tmp_path / "moved.png")
    with pytest.raises(ConfigError, match=r"gone.png: a symbolic link to nothing \(its target .*moved.png does not"):
        discover_inputs([tmp_path / "links" / "gone.png"])
    with pytest.raises(ConfigError, match="pattern matches no image files"):
        discover_inputs([str(tmp_path / "*.png")])
    (tmp_path / "empty").mkdir()
    _touch(tmp_path / "empty" / "notes.txt")
    with pytest.raises(ConfigError, match="folder holds no image files"):
        discover_inputs([tmp_path / "empty"])


def test_real_images_in_a_folder(cxr4_dir: Path, tmp_path: Path) -> None:
    src = sorted((cxr4_dir / "images" / "covid").iterdir())[:3]
    for p in src:
        shutil.copy(p, tmp_path / p.name)
    assert [Path(i.path).name for i in discover_inputs([tmp_path])] == sorted(p.name for p in src)


def test_linked_folders_are_followed_once_and_dangling_links_kept(tmp_path: Path) -> None:
    """A folder reached through a link is walked (as a pattern would reach it), a loop is not; a link to
    nowhere is kept (its row says why it was not read)."""
    _touch(tmp_path / "real" / "a.png")
    _touch(tmp_path / "top" / "b.png")
    os.symlink(tmp_path / "real", tmp_path / "top" / "linked")
    os.symlink(tmp_path / "top", tmp_path / "top" / "loop")  # a link back up the tree
    os.symlink(tmp_path / "gone.png", tmp_path / "top" / "dangling.png")
    found = [Path(i.path).relative_to(tmp_path / "top").as_posix() for i in discover_inputs([tmp_path / "top"])]
    assert found == ["b.png", "dangling.png", "linked/a.png"]


def test_a_folder_that_cannot_be_listed_is_named(tmp_path: Path, deny_access) -> None:  # noqa: ANN001
    _touch(tmp_path / "b.png")
    locked = tmp_path / "locked"
    _touch(locked / "c.png")
    deny_access("scandir", locked)
    with pytest.raises(ConfigError, match=f"{locked}: cannot list this folder \\(Permission denied\\)"):
        discover_inputs([tmp_path])
    with pytest.raises(ConfigError, match=f"{locked}: cannot list this folder \\(Permission denied\\)"):
        discover_inputs([str(tmp_path / "**" / "*.png")])  # Python's glob passes over it without a word


def test_a_name_that_is_not_utf8_is_written_escaped_and_read_as_it_is(tmp_path: Path) -> None:
    name = os.fsdecode(b"scan-\xff\xfe.png")
    _touch(tmp_path / name)
    (item,) = discover_inputs([tmp_path])
    assert item.path == str(tmp_path / "scan-\\xff\\xfe.png") and item.source == str(tmp_path / name)
    item.path.encode("utf-8")  # the outputs hold UTF-8 text only
    assert os.path.isfile(item.source)


def test_a_manifest_with_a_bad_header_is_refused(tmp_path: Path) -> None:
    """The same header checks as data manifests: a column named twice, another separator."""
    (tmp_path / "m.csv").write_text("path,label,label\na.png,covid,normal\n")
    with pytest.raises(ManifestError, match="column 'label' appears 2 times in the header"):
        read_score_manifest(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("path;label\na.png;covid\n")
    with pytest.raises(ManifestError, match="one column named 'path;label': a manifest's columns are separated by commas"):
        read_score_manifest(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("")
    with pytest.raises(ManifestError, match="empty file: no header row"):
        read_score_manifest(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("path,label,,\na.png,covid,,\n")  # a spreadsheet's trailing commas
    assert [i.extra for i in read_score_manifest(tmp_path / "m.csv")] == [{"label": "covid"}]



def test_deep_trees_and_many_links_to_one_folder_are_walked_once(tmp_path: Path) -> None:
    """1200 nested folders (the walk re-resolved every ancestor of every folder, cubic in depth, and the pattern
    walk recursed past Python's limit), and 16 levels of two links each to the next (2 ** 16 ways down)."""
    deep = folder = tmp_path / "deep"
    try:
        for _ in range(1200):  # not os.makedirs: it recurses too
            folder = folder / "d"
            folder.mkdir(parents=folder.parent == deep)
        bottom = _touch(folder / "x.png")
        assert [i.path for i in discover_inputs([deep])] == [str(bottom)]
        assert [i.path for i in discover_inputs([str(deep / "**" / "*.png")])] == [str(bottom)]
    finally:  # bottom up, without recursion: shutil.rmtree (pytest's clean-up of old runs) recurses past the limit
        (folder / "x.png").unlink(missing_ok=True)
        while folder != tmp_path and folder.exists():
            folder.rmdir()
            folder = folder.parent
    wide = tmp_path / "wide"
    for level in range(16):
        (wide / f"l{level}").mkdir(parents=True)
        for link in ("a", "b"):
            os.symlink(wide / f"l{level + 1}", wide / f"l{level}" / link)
    (wide / "l16").mkdir()
    _touch(wide / "l16" / "y.png")
    found = list(walk_files(wide / "l0"))
    assert [os.path.relpath(p, wide / "l0") for p in found] == ["/".join(["a"] * 16 + ["y.png"])]


def test_two_files_shown_under_one_name_are_refused(tmp_path: Path) -> None:
    """A name that is not UTF-8 is shown with \\x.. escapes; a second file named with those characters would have
    shared its rows (--resume then dropped one)."""
    _touch(Path(os.fsdecode(os.fsencode(tmp_path) + b"/x\xff.jpg")))
    _touch(tmp_path / "x\\xff.jpg")
    with pytest.raises(ConfigError, match=r"x\\xff.jpg: two files would be written under this name"):
        discover_inputs([tmp_path])


def test_walks_list_each_folder_once_and_name_one_they_cannot_enter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     deny_access) -> None:  # noqa: ANN001
    """A folder listed in its parent but not to be entered (the parent readable, not searchable) is named (its
    images were left out without a word); each folder is listed once; a missing top is told to onerror."""
    for rel in ("a/x.png", "a/sub/y.png", "b/z.png"):
        _touch(tmp_path / rel)
    listed: list[str] = []
    scandir = os.scandir

    def counting(path):  # the real listing, counted
        listed.append(os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", counting)
    assert sorted(os.path.relpath(p, tmp_path) for p in walk_files(tmp_path)) == ["a/sub/y.png", "a/x.png", "b/z.png"]
    assert sorted(listed) == sorted(str(tmp_path / d) for d in ("", "a", "a/sub", "b")), listed
    locked = tmp_path / "a" / "sub"
    deny_access("stat", locked)  # listed in its parent, not to be entered
    with pytest.raises(ConfigError, match=f"{locked}: cannot list this folder \\(Permission denied\\)"):
        discover_inputs([tmp_path])
    told: list[OSError] = []
    assert list(walk_files(tmp_path / "absent", onerror=told.append)) == [] and len(told) == 1
