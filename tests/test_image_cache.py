"""The decoded-image cache: build, hit, invalidation, damage, races, unwritable folders; the streaming batches."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms

import clebench.data.datasets
from clebench.data import image_cache
from clebench.cli import main
from clebench.data.datasets import batches, load_images, to_device
from clebench.data.decode import decode_into
from clebench.models import Preprocessing
from clebench.precision import PRECISION_POLICY, device_info, fp32_precision
from clebench.sweep.results import TIMING_COLUMNS

WNIDS = ("n01440764", "n02102040")
MAP = {"n01440764": 0, "n02102040": 217}
PREP = Preprocessing(resize=12, crop=8, mean=(0.5, 0.25, 0.125), std=(0.5, 0.5, 0.25))


def _write(path: Path, seed: int, mode: str = "RGB") -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (15, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """<tmp>/data/split/<wnid>/<3 random-pixel PNGs> (one greyscale), as an ImageNet-style split."""
    for c, wnid in enumerate(WNIDS):
        (tmp_path / "data" / "split" / wnid).mkdir(parents=True)
        for k in range(3):
            _write(tmp_path / "data" / "split" / wnid / f"{k}.png", 10 * c + k, "L" if (c, k) == (1, 2) else "RGB")
    return tmp_path / "data"


def _load(folder: Path, cache: Path | None, preprocessing: Preprocessing = PREP, **kwargs) -> clebench.data.datasets.ImageSet:
    return load_images("imagenet", "split", folder, preprocessing, wnid_to_idx=MAP, progress=False,
                       cache=cache is not None, cache_dir=cache, **kwargs)


def _assert_same(a: clebench.data.datasets.ImageSet, b: clebench.data.datasets.ImageSet) -> None:
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert (a.files, a.converted, a.skipped, a.name) == (b.files, b.converted, b.skipped, b.name)


def _entries(cache: Path) -> list[str]:
    return [e["name"] for e in image_cache.list_entries(cache)]


def test_build_then_hit_maps_the_same_images_without_decoding(folder, tmp_path, monkeypatch):
    cold = _load(folder, tmp_path / "cache")
    assert len(_entries(tmp_path / "cache")) == 1
    assert cold.converted == [f"{WNIDS[1]}/2.png"] and cold.labels.tolist() == [0, 0, 0, 217, 217, 217]

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cache hit decoded images")

    monkeypatch.setattr(clebench.data.datasets, "decode_into", no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning about non-writable numpy arrays
        warm = _load(folder, tmp_path / "cache")
    _assert_same(warm, cold)
    warm.images[0] += 1  # copy-on-write: the cache file is untouched
    _assert_same(_load(folder, tmp_path / "cache"), cold)


def test_cached_uncached_and_plain_pil_pixels_are_identical(folder, tmp_path):
    cached, uncached = _load(folder, tmp_path / "cache"), _load(folder, None)
    _assert_same(cached, uncached)
    reference = transforms.Compose([transforms.Resize(12), transforms.CenterCrop(8), transforms.PILToTensor()])
    for row, file in enumerate(cached.files):
        with Image.open(folder / "split" / file) as image:
            assert torch.equal(cached.images[row], reference(image.convert("RGB")))


def test_shared_imagenet_sample_cached_equals_pil_reference(data_root, tmp_path):
    prep = Preprocessing(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    cached = load_images("imagenet", "imagenet-sample", data_root, prep, limit=4, cache_dir=tmp_path, progress=False)
    _assert_same(cached, load_images("imagenet", "imagenet-sample", data_root, prep, limit=4, cache=False,
                                     progress=False))
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])
    for row, file in enumerate(cached.files):
        with Image.open(data_root / "imagenet-sample" / file) as image:
            assert torch.equal(cached.images[row], reference(image.convert("RGB")))


def test_process_pool_and_threads_decode_identical_rows(folder, tmp_path):
    broken = folder / "split" / WNIDS[0] / "1.png"
    broken.write_bytes(broken.read_bytes()[:40])
    paths = sorted((folder / "split").glob("*/*.png"))
    results = []
    for processes in (False, True):
        target = tmp_path / f"{processes}.npy"
        found = decode_into(target, len(paths), PREP, open_image=lambda i: Image.open(paths[i]), paths=paths,
                            workers=2, processes=processes, progress=False)
        results.append((np.load(target), found.converted, sorted(found.errors)))
    assert np.array_equal(results[0][0], results[1][0]) and results[0][1:] == results[1][1:] == ([5], [1])
    assert not results[0][0][1].any()  # the broken file's row is zero
    with pytest.raises(ValueError, match="paths="):
        decode_into(tmp_path / "x.npy", 1, PREP, open_image=lambda i: Image.open(paths[i]), processes=True)


def test_mean_and_std_are_not_part_of_the_key(folder, tmp_path):
    other = Preprocessing(resize=12, crop=8, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))
    _assert_same(_load(folder, tmp_path / "cache"), _load(folder, tmp_path / "cache", other))
    assert len(_entries(tmp_path / "cache")) == 1
    _load(folder, tmp_path / "cache", Preprocessing(resize=12, crop=6, mean=(0.5,) * 3, std=(0.5,) * 3))
    _load(folder, tmp_path / "cache", limit=2)
    assert len(_entries(tmp_path / "cache")) == 3


def test_touched_file_invalidates_the_entry_with_a_message(folder, tmp_path):
    _load(folder, tmp_path / "cache")
    changed = folder / "split" / WNIDS[0] / "1.png"
    _write(changed, 99)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.warns(UserWarning, match=rf"source file .*{WNIDS[0]}/1\.png changed"):
        rebuilt = _load(folder, tmp_path / "cache")
    _assert_same(rebuilt, _load(folder, None))
    assert len(_entries(tmp_path / "cache")) == 1


def test_deleted_file_removes_the_stale_entry_with_a_message(folder, tmp_path):
    _load(folder, tmp_path / "cache")
    (folder / "split" / WNIDS[0] / "0.png").unlink()
    with pytest.warns(UserWarning, match=rf"source file .*{WNIDS[0]}/0\.png is missing"):
        images = _load(folder, tmp_path / "cache")
    assert len(images) == 5 and len(_entries(tmp_path / "cache")) == 1


def test_truncated_images_file_is_detected_and_rebuilt(folder, tmp_path):
    _load(folder, tmp_path / "cache")
    images_file = tmp_path / "cache" / _entries(tmp_path / "cache")[0] / image_cache.IMAGES
    with open(images_file, "r+b") as handle:
        handle.truncate(images_file.stat().st_size - 100)
    with pytest.warns(UserWarning, match="is damaged"):
        rebuilt = _load(folder, tmp_path / "cache")
    _assert_same(rebuilt, _load(folder, None))  # (a mapping of the truncated file would read zeros past its end)
    assert images_file.stat().st_size == np.lib.format.open_memmap(images_file, mode="r").offset + 6 * 3 * 8 * 8


def test_unreadable_file_fails_the_same_way_cold_and_warm(folder, tmp_path):
    broken = folder / "split" / WNIDS[1] / "0.png"
    broken.write_bytes(broken.read_bytes()[:40])
    for _ in range(2):  # the second load is a cache hit
        with pytest.raises(ValueError, match=rf"1 of 6 images .*{WNIDS[1]}/0\.png"):
            _load(folder, tmp_path / "cache")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        images = _load(folder, tmp_path / "cache", skip_unreadable=True)
    assert images.skipped == [f"{WNIDS[1]}/0.png"] and len(images) == 5 and images.images.shape[0] == 5
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        _assert_same(images, _load(folder, None, skip_unreadable=True))


def test_concurrent_builders_in_two_processes_both_get_a_valid_entry(folder, tmp_path):
    script = (
        "import sys, clebench.data.datasets as d; from clebench.models import Preprocessing;"
        f"s = d.load_images('imagenet', 'split', {str(folder)!r}, Preprocessing(12, 8, (0.5,)*3, (0.5,)*3),"
        f" wnid_to_idx={MAP!r}, progress=False, cache_dir={str(tmp_path / 'cache')!r});"
        "print(int(s.images.long().sum()), len(s))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    expected = _load(folder, None)
    assert outputs == [f"{int(expected.images.long().sum())} 6\n"] * 2
    assert len(_entries(tmp_path / "cache")) == 1
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_builder_without_a_lock_keeps_the_entry_another_finished_first(folder, tmp_path, monkeypatch):
    """Where there is no flock, a builder whose rename loses the race uses the winner's entry."""
    monkeypatch.setattr(image_cache, "fcntl", None)
    index = {"origin": str(folder / "split"), "stat_names": [f"{WNIDS[0]}/0.png"]}

    def write(value: int):
        def decode(target: Path) -> dict:
            if value == 1:  # "another process" builds and publishes the entry meanwhile
                image_cache.build_entry(tmp_path / "cache", "entry", index, write(2))
            np.save(target, np.full((1, 3, 2, 2), value, dtype=np.uint8))
            return {}
        return decode

    entry = image_cache.build_entry(tmp_path / "cache", "entry", index, write(1))
    assert entry.images.tolist() == np.full((1, 3, 2, 2), 2).tolist()
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == ["entry"]


def test_unwritable_cache_folder_falls_back_with_a_warning(folder, tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.warns(UserWarning, match=r"cannot use the image cache folder .*a-file.*CLEBENCH_CACHE"):
        images = _load(folder, tmp_path / "a-file" / "cache")
    _assert_same(images, _load(folder, None))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_folder_falls_back_with_a_warning(folder, tmp_path):
    (tmp_path / "cache").mkdir(mode=0o555)
    with pytest.warns(UserWarning, match="cannot use the image cache folder"):
        _assert_same(_load(folder, tmp_path / "cache"), _load(folder, None))


def test_cache_dir_default_and_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CLEBENCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert image_cache.cache_dir() == tmp_path / "xdg" / "clebench"
    monkeypatch.setenv("CLEBENCH_CACHE", str(tmp_path / "env"))
    assert image_cache.cache_dir() == tmp_path / "env"
    assert image_cache.cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_cli_cache_ls_and_clear(folder, tmp_path, capsys):
    _load(folder, tmp_path / "cache")
    (name,) = _entries(tmp_path / "cache")
    assert main(["cache", "ls", "--cache-dir", str(tmp_path / "cache")]) == 0
    listed = capsys.readouterr().out
    assert name in listed and "6 images" in listed and "1 entries" in listed
    assert main(["cache", "clear", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert capsys.readouterr().out.startswith("deleted 1 entries")
    assert list((tmp_path / "cache").iterdir()) == []


def test_staged_and_resident_batches_equal_streamed_batches(folder, tmp_path):
    images = _load(folder, tmp_path / "cache")
    streamed = list(batches(images, 4, PREP))
    assert [len(y) for _, y in streamed] == [4, 2]
    assert to_device(images, "cpu") is images
    staged = list(clebench.data.datasets._staged(images.images, images.labels, 4, torch.device("cpu")))
    for (x, y), (raw, labels) in zip(streamed, staged):
        mean, std = torch.tensor(PREP.mean).view(1, 3, 1, 1), torch.tensor(PREP.std).view(1, 3, 1, 1)
        assert torch.equal(x, raw.float().div_(255).sub_(mean).div_(std)) and torch.equal(y, labels)
    assert torch.equal(torch.cat([raw for raw, _ in staged]), images.images)  # buffers reused, batches intact


@pytest.mark.parametrize("before", [(True, True), (False, True), (True, False)])
def test_fp32_precision_turns_tf32_off_and_restores_the_flags(before):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
        with pytest.raises(RuntimeError, match="inside"), fp32_precision():
            assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, False)
            raise RuntimeError("inside")
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_device_info_on_cpu():
    info = device_info("cpu")
    assert info["precision_policy"] == PRECISION_POLICY and info["torch_version"] == torch.__version__
    assert info["cpu_isa"] == torch.backends.cpu.get_cpu_capability() and info["device_name"] == info["cpu_name"]
    assert info["cudnn_version"] is None


SWEEP = """
models = ["mobilenet_v2_cifar10"]
steps = ["bn_fold+cls_relu6_clip"]
quant = ["w8a8_per_tensor_minmax"]

[data]
dataset = "cifar10"
limit = 20
calibration = 20
batch_size = 10
"""


@pytest.mark.slow
def test_sweep_results_identical_with_the_cache_cold_warm_and_disabled(tmp_path, data_root, models_dir, monkeypatch):
    config = tmp_path / "tiny.toml"
    config.write_text(SWEEP)
    monkeypatch.setenv("CLEBENCH_CACHE", str(tmp_path / "cache"))
    tables = []
    for run, flags in (("cold", []), ("warm", []), ("off", ["--no-cache"])):
        assert main(["sweep", str(config), "--out", str(tmp_path / run), "--data-root", str(data_root),
                     "--models-dir", str(models_dir), "--no-progress", *flags]) == 0
        tables.append(pd.read_csv(tmp_path / run / "results.csv").drop(columns=TIMING_COLUMNS).to_csv(index=False))
    assert len(_entries(tmp_path / "cache")) == 2  # the evaluation and the calibration images
    assert tables[0] == tables[1] == tables[2]
