"""Command inputs: one set of rules for ``tadm downscale/upscale`` (files) and ``tadm evaluate`` (files and
shards): recursion, extension filtering with one warning per folder, repeats, errors, the excluded output
folder."""

from __future__ import annotations

import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tadm.datamodules.inputs import InputFile, InputShard, collect_inputs, iter_hr_images, resolve_inputs
from tadm.errors import InputError


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    return path


def _tar(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w"):
        pass
    return path


def _rels(files: list[InputFile]) -> list[str]:
    return [f.rel.as_posix() for f in files]


def test_folders_recurse_and_name_outputs_by_relative_path(tmp_path: Path) -> None:
    _png(tmp_path / "in" / "a.png")
    _png(tmp_path / "in" / "sub" / "b.v2.png")
    single = _png(tmp_path / "x.png")
    files = collect_inputs([str(tmp_path / "in"), str(single)])
    assert _rels(files) == ["a", "sub/b.v2", "x"]
    assert _rels(collect_inputs([str(tmp_path / "in" / "**" / "*.png")])) == ["a", "b.v2"]


def test_one_warning_per_folder_for_non_images_but_not_for_hidden_files_or_consumed_shards(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "in"
    _png(folder / "a.png")
    (folder / "notes.txt").write_text("x")
    (folder / "sub").mkdir()
    (folder / "sub" / "readme.md").write_text("x")
    (folder / ".DS_Store").write_text("x")
    _tar(folder / "shards" / "val-000000.tar")
    (folder / "shards" / "index.json").write_text("{}")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sources = resolve_inputs([str(folder)], shards=True)
    skipped = [str(w.message) for w in record if "not images" in str(w.message)]
    assert len(skipped) == 1 and "skipping 2 file(s)" in skipped[0]  # notes.txt, readme.md
    assert [type(s) for s in sources] == [InputFile, InputShard]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        files = collect_inputs([str(folder)])  # without shards, the tar and its index are not inputs
    skipped = [str(w.message) for w in record if "not images" in str(w.message)]
    assert len(skipped) == 1 and "skipping 4 file(s)" in skipped[0]
    assert _rels(files) == ["a"]


def test_the_same_file_named_twice_is_used_once_with_a_warning(tmp_path: Path) -> None:
    a = _png(tmp_path / "in" / "a.png")
    with pytest.warns(UserWarning, match="1 input"):
        files = collect_inputs([str(a), str(tmp_path / "in")])
    assert [f.path for f in files] == [a]
    with pytest.warns(UserWarning, match="2 input"):
        assert len(iter_hr_images([str(a), str(a), str(tmp_path / "in" / "*.png")]).sources) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pattern reaching a file twice is not the user's repeat
        assert len(collect_inputs([str(tmp_path / "**")])) == 1


def test_bad_inputs_are_input_errors_naming_them(tmp_path: Path) -> None:
    _png(tmp_path / "one" / "x.png")
    _png(tmp_path / "two" / "x.jpg", seed=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no inputs given"):
        collect_inputs([])
    with pytest.raises(InputError, match="nope.png' does not exist"):
        collect_inputs([str(tmp_path / "nope.png")])
    with pytest.raises(InputError, match=r"no file matches the input pattern '.*\*\.gif'"):
        iter_hr_images([str(tmp_path / "*.gif")])
    with pytest.raises(InputError, match="empty' holds no images"):
        collect_inputs([str(tmp_path / "empty")])
    with pytest.raises(InputError, match=r"'.*one/x.png' and '.*two/x.jpg' would both write 'x.png'"):
        collect_inputs([str(tmp_path / "one" / "x.png"), str(tmp_path / "two" / "x.jpg")])
    assert (
        len(iter_hr_images([str(tmp_path / "one" / "x.png"), str(tmp_path / "two" / "x.jpg")]).sources) == 2
    )


def test_the_codec_inputs_refuse_shards_with_a_clear_error(tmp_path: Path) -> None:
    tar = _tar(tmp_path / "shards" / "val-000000.tar")
    (tmp_path / "shards" / "index.json").write_text('{"format": "tadm-shards", "shards": []}')
    with pytest.raises(InputError, match="val-000000.tar' is a WebDataset shard; .* image files only"):
        collect_inputs([str(tar)])
    with pytest.raises(InputError, match="index.json' is a shard index"):
        collect_inputs([str(tmp_path / "shards" / "index.json")])
    with pytest.raises(InputError, match="is a URL"):
        collect_inputs(["s3://bucket/photos/a.png"])
    with (
        pytest.raises(InputError, match=r"holds no images .* \(it holds .tar shards"),
        pytest.warns(UserWarning),
    ):
        collect_inputs([str(tmp_path / "shards")])
    with pytest.raises(
        InputError, match=r"val-\{000000..000001\}.tar': shard '.*val-000001.tar' does not exist"
    ):
        iter_hr_images([str(tmp_path / "shards" / "val-{000000..000001}.tar")])


def test_the_excluded_output_folder_is_never_read(tmp_path: Path) -> None:
    """A command passes its output folder: outputs written inside the input folder are not inputs next run."""
    src = tmp_path / "photos"
    _png(src / "a.png")
    _png(src / "sub" / "b.png", seed=1)
    out = src / "lr"
    _png(out / "a.png", seed=2)  # written by the previous run
    _png(out / "sub" / "b.png", seed=3)
    assert _rels(collect_inputs([str(src)], exclude=out)) == ["a", "sub/b"]
    assert len(iter_hr_images([str(src)], exclude=out).sources) == 2
    assert _rels(collect_inputs([str(src / "**" / "*.png")], exclude=out)) == ["a", "b"]
    with pytest.raises(InputError, match=r"'.*lr/a.png' is inside '.*lr'.*output folder"):
        collect_inputs([str(out / "a.png")], exclude=out)
    with pytest.raises(InputError, match="is inside"):
        collect_inputs([str(src)], exclude=src)  # writing into the input folder itself
    with pytest.raises(InputError, match=r"no file matches the input pattern '.*' outside '.*lr'"):
        collect_inputs([str(out / "*.png")], exclude=out)
    assert len(collect_inputs([str(src)])) == 4  # without exclude, the old outputs would be read


def test_a_shard_or_folder_with_nothing_to_read_is_one_error_like_an_empty_folder(tmp_path: Path) -> None:
    """An empty shard named on its own (or through an index or a pattern), or a folder whose only shards are
    empty, is refused like an empty folder; a folder with images beside an empty shard is fine."""
    empty = _tar(tmp_path / "e.tar")
    with pytest.raises(InputError, match=r"input '.*e\.tar' is a shard with no samples"):
        iter_hr_images([str(empty)])
    with pytest.raises(InputError, match=r"input '.*/e\.tar' is a shard with no samples"):  # the match
        iter_hr_images([str(tmp_path / "e*.tar")])
    only_empty = tmp_path / "only_empty"
    _tar(only_empty / "val-000000.tar")
    with pytest.raises(InputError, match=r"input folder '.*only_empty' holds no images and its \.tar shards"):
        iter_hr_images([str(only_empty)])
    listed = tmp_path / "listed"
    _tar(listed / "val-000000.tar")
    index = '{"format": "tadm-shards", "version": 1, "shards": [{"name": "val-000000.tar", "count": 0}]}'
    (listed / "index.json").write_text(index)
    with pytest.raises(InputError, match=r"listed' lists shards that hold no samples"):
        iter_hr_images([str(listed)])
    _png(only_empty / "a.png")
    assert iter_hr_images([str(only_empty)]).total == 1


def test_a_name_clash_hint_fits_what_was_passed(tmp_path: Path) -> None:
    """Two folders holding files of one stem: naming folders again cannot help, so the hint must not say so;
    it names both files, says outputs are named by their path inside the folder given, and what to do."""
    a, b = _png(tmp_path / "d1" / "x.png"), _png(tmp_path / "d2" / "x.png", seed=1)
    with pytest.raises(InputError) as info:
        collect_inputs([str(tmp_path / "d1"), str(tmp_path / "d2")])
    message = str(info.value)
    assert f"'{a}' and '{b}' would both write 'x.png'" in message
    assert "pass their folders instead" not in message
    assert "path inside the folder given" in message and "into different output folders" in message
    # two files named directly: a folder holding both keeps their relative paths apart
    with pytest.raises(InputError, match="written under their stem; pass a folder that holds both"):
        collect_inputs([str(a), str(b)])
    assert _rels(collect_inputs([str(tmp_path)])) == ["d1/x", "d2/x"]
    # one folder holding x.png and x.jpg: no way of passing it avoids the clash
    _png(tmp_path / "d1" / "x.jpg", seed=2)
    with pytest.raises(InputError, match=r"same stem in '.*d1': rename one"):
        collect_inputs([str(tmp_path / "d1")])
