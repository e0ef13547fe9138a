import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms

import clebench.data.datasets
from clebench.data.datasets import balanced_subset, batches, list_datasets, load_images
from clebench.models import Preprocessing

WNIDS = ("n01440764", "n02102040", "n03888257")  # ImageNet-1k indices 0, 217, 701
WNID_TO_IDX = {"n01440764": 0, "n02102040": 217, "n03888257": 701}
# File names whose string order differs from their numeric order.
NAMES = ("10.png", "2.png", "7.png", "9.png", "a1.png")
PLAIN = Preprocessing(resize=None, crop=8, mean=(0.5, 0.25, 0.125), std=(0.5, 0.5, 0.25))


def _solid(path: Path, value: int, mode: str = "RGB", size=(8, 8)) -> None:
    color = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, size, color).save(path)


def _rgb_of(value: int, mode: str) -> tuple[int, int, int]:
    return (value, value, value) if mode == "L" else (value, 255 - value, value // 2)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """<tmp>/sub/<wnid>/<5 solid-colour PNGs>, the second class partly greyscale; wnid map at <tmp>."""
    for c, wnid in enumerate(WNIDS):
        (tmp_path / "sub" / wnid).mkdir(parents=True)
        for k, name in enumerate(NAMES):
            mode = "L" if c == 1 and k % 2 == 0 else "RGB"
            _solid(tmp_path / "sub" / wnid / name, 40 * c + 10 * k, mode)
    (tmp_path / "imagenet_wnid_to_idx.json").write_text(json.dumps({"wnid_to_idx": WNID_TO_IDX}))
    return tmp_path


def test_list_datasets():
    assert list_datasets() == ["cifar10", "cifar100", "imagenet", "imagenette", "imagefolder"]


@pytest.mark.parametrize("limit, expected", [
    (7, [0, 1, 2, 5, 6, 10, 11]),  # ceil(7/3) = 3 per class, then one dropped from each of the last two classes
    (9, [0, 1, 2, 5, 6, 7, 10, 11, 12]),
    (3, [0, 5, 10]),
    (100, list(range(15))),
])
def test_balanced_subset_takes_first_per_class_and_trims_last_classes(limit, expected):
    labels = [0] * 5 + [1] * 5 + [2] * 5
    assert balanced_subset(labels, limit) == expected


@pytest.mark.parametrize("limit, counts", [
    (8, [3, 3, 1]),  # ceil(8/3) = 3 per class, but the last class has only 1: fewer than limit, no padding
    (4, [2, 1, 1]),  # 2+2+1 = 5: the one extra comes off the last class holding the most
])
def test_balanced_subset_with_a_short_class(limit, counts):
    labels = [0] * 5 + [1] * 5 + [2] * 1
    chosen = balanced_subset(labels, limit)
    assert [sum(labels[i] == c for i in chosen) for c in range(3)] == counts


def test_balanced_subset_seeded_is_reproducible_and_balanced():
    labels = [c for c in range(10) for _ in range(100)]
    first, again, other = (balanced_subset(labels, 55, seed=s) for s in (3, 3, 4))
    assert first == again and first != other
    counts = [sum(labels[i] == c for i in first) for c in range(10)]
    assert counts == [6] * 5 + [5] * 5
    assert first != balanced_subset(labels, 55)


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_balanced_subset_rejects_bad_limit(limit):
    with pytest.raises(ValueError, match="limit"):
        balanced_subset([0, 1], limit)


def test_load_images_balanced_subset_is_first_sorted_files_per_class(folder):
    images = load_images("imagenet", "sub", folder, PLAIN, limit=7, progress=False)
    per_class = math.ceil(7 / 3)
    expected = [f"{w}/{n}" for w in WNIDS for n in sorted(NAMES)[:per_class]]
    expected.remove(f"{WNIDS[1]}/{sorted(NAMES)[2]}")
    expected.remove(f"{WNIDS[2]}/{sorted(NAMES)[2]}")
    assert images.files == expected
    assert images.labels.tolist() == [0, 0, 0, 217, 217, 701, 701]
    assert images.images.shape == (7, 3, 8, 8) and images.images.dtype == torch.uint8
    assert images.name == "imagenet/sub" and images.label_space == "imagenet"


def test_load_images_decodes_pixels_and_counts_greyscale(folder):
    images = load_images("imagenet", "sub", folder, PLAIN, progress=False)
    assert len(images) == 15
    greyscale = [f"{WNIDS[1]}/{NAMES[k]}" for k in (0, 2, 4)]
    assert sorted(images.converted) == sorted(greyscale)
    for row, file in enumerate(images.files):
        wnid, name = file.split("/")
        c, k = WNIDS.index(wnid), NAMES.index(name)
        rgb = _rgb_of(40 * c + 10 * k, "L" if file in greyscale else "RGB")
        assert images.images[row].flatten(1).tolist() == [[v] * 64 for v in rgb]


def test_load_images_is_deterministic(folder):
    first = load_images("imagenet", "sub", folder, PLAIN, limit=5, seed=1, progress=False)
    again = load_images("imagenet", "sub", folder, PLAIN, limit=5, seed=1, progress=False)
    assert first.files == again.files and torch.equal(first.images, again.images)
    everything = load_images("imagenet", "sub", folder, PLAIN, seed=1, progress=False)  # no limit: seed is moot
    assert everything.files == load_images("imagenet", "sub", folder, PLAIN, progress=False).files


def test_truncated_file_raises_or_is_skipped_and_reported(folder):
    broken = folder / "sub" / WNIDS[0] / "2.png"
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"1 of 15 images .*n01440764/2\.png.*skip_unreadable"):
        load_images("imagenet", "sub", folder, PLAIN, progress=False)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        images = load_images("imagenet", "sub", folder, PLAIN, skip_unreadable=True, progress=False)
    assert images.skipped == [f"{WNIDS[0]}/2.png"]
    assert len(images) == 14 and images.images.shape[0] == 14 and f"{WNIDS[0]}/2.png" not in images.files


def test_empty_class_folder_is_an_error(folder):
    for file in (folder / "sub" / WNIDS[2]).iterdir():
        file.unlink()
    (folder / "sub" / WNIDS[2] / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=rf"{WNIDS[2]} holds no images"):
        load_images("imagenet", "sub", folder, PLAIN, progress=False)


def test_missing_split_folder_names_where_it_looked(folder):
    with pytest.raises(FileNotFoundError, match=r"nope.*looked for"):
        load_images("imagenet", "nope", folder, PLAIN, progress=False)


def test_imagenet_labels_from_explicit_map_and_error_without_one(folder):
    (folder / "imagenet_wnid_to_idx.json").unlink()
    with pytest.raises(ValueError, match="wnid_to_idx="):
        load_images("imagenet", "sub", folder, PLAIN, progress=False)
    images = load_images("imagenet", folder / "sub", folder, PLAIN, limit=3, wnid_to_idx=WNID_TO_IDX, progress=False)
    assert images.labels.tolist() == [0, 217, 701]
    with pytest.raises(ValueError, match=r"n03888257.*missing from the map"):
        load_images("imagenet", "sub", folder, PLAIN, wnid_to_idx={"n01440764": 0, "n02102040": 217}, progress=False)


def test_non_wnid_folder_is_an_error(folder):
    (folder / "sub" / "cat").mkdir()
    _solid(folder / "sub" / "cat" / "1.png", 3)
    with pytest.raises(ValueError, match=r"wnid folders.*cat"):
        load_images("imagenet", "sub", folder, PLAIN, progress=False)


IMAGENETTE_WNIDS = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
                    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257")


def _imagenette_labels(root: Path) -> list[int]:
    for wnid in IMAGENETTE_WNIDS:
        (root / "imagenette2-160" / "val" / wnid).mkdir(parents=True)
        _solid(root / "imagenette2-160" / "val" / wnid / "x.png", 1)
    images = load_images("imagenette", "test", root, PLAIN, progress=False)
    assert images.name == "imagenette/val"
    return images.labels.tolist()


def test_imagenette_uses_builtin_imagenet_indices(tmp_path):
    assert _imagenette_labels(tmp_path) == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]


def test_builtin_imagenette_map_agrees_with_shared_map(tmp_path, data_root):
    shared = json.loads((data_root / "imagenet_wnid_to_idx.json").read_text())["wnid_to_idx"]
    assert _imagenette_labels(tmp_path) == [shared[w] for w in IMAGENETTE_WNIDS]


def test_cifar_imagefolder_layout_and_errors(tmp_path):
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for c, name in enumerate(classes):
        (tmp_path / "cifar10" / "test" / name).mkdir(parents=True)
        for k in range(3):
            _solid(tmp_path / "cifar10" / "test" / name / f"{k:04d}.png", c, size=(32, 32))
    cifar = Preprocessing(resize=None, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    images = load_images("cifar10", "val", tmp_path, cifar, limit=12, progress=False)
    assert images.labels.tolist() == [0, 0, 1, 1] + list(range(2, 10))
    assert images.files[:3] == ["airplane/0000.png", "airplane/0001.png", "automobile/0000.png"]
    with pytest.raises(FileNotFoundError, match=r"cifar10.*train.*cifar-10-batches-py.*download=True"):
        load_images("cifar10", "train", tmp_path, cifar, progress=False)
    with pytest.raises(ValueError, match="splits"):
        load_images("cifar10", "validation", tmp_path, cifar, progress=False)
    (tmp_path / "cifar10" / "test" / "truck").rename(tmp_path / "truck")
    with pytest.raises(ValueError, match="9 class folders"):
        load_images("cifar10", "test", tmp_path, cifar, progress=False)


def test_bad_arguments(folder):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_images("mnist", "train", folder, PLAIN)
    with pytest.raises(TypeError, match="Preprocessing"):
        load_images("imagenet", "sub", folder, {"crop": 8})


def test_data_root(monkeypatch, tmp_path):
    monkeypatch.delenv("CLEBENCH_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="CLEBENCH_DATA"):
        clebench.data.datasets.data_root()
    monkeypatch.setenv("CLEBENCH_DATA", str(tmp_path))
    assert clebench.data.datasets.data_root() == tmp_path
    assert clebench.data.datasets.data_root(tmp_path / "x", create=True) == tmp_path / "x"
    with pytest.raises(FileNotFoundError, match="missing"):
        clebench.data.datasets.data_root(tmp_path / "missing")


def test_resize_and_crop_match_torchvision_transforms(tmp_path):
    (tmp_path / "sub" / WNIDS[0]).mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (30, 50, 3), dtype=torch.uint8, generator=generator).numpy()
    Image.fromarray(pixels).save(tmp_path / "sub" / WNIDS[0] / "x.png")
    for interpolation in ("bilinear", "bicubic"):
        prep = Preprocessing(resize=20, crop=16, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation=interpolation)
        images = load_images("imagenet", "sub", tmp_path, prep, wnid_to_idx={WNIDS[0]: 0}, progress=False)
        reference = transforms.Compose([
            transforms.Resize(20, interpolation=transforms.InterpolationMode(interpolation)),
            transforms.CenterCrop(16),
            transforms.PILToTensor(),
        ])(Image.fromarray(pixels))
        assert torch.equal(images.images[0], reference)


def test_batches_normalise_and_keep_order(folder):
    images = load_images("imagenet", "sub", folder, PLAIN, progress=False)
    got = list(batches(images, 4, PLAIN))
    assert [x.shape[0] for x, _ in got] == [4, 4, 4, 3]
    x = torch.cat([x for x, _ in got])
    y = torch.cat([y for _, y in got])
    mean = torch.tensor(PLAIN.mean).view(1, 3, 1, 1)
    std = torch.tensor(PLAIN.std).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and torch.equal(y, images.labels)
    torch.testing.assert_close(x, (images.images.float() / 255 - mean) / std)
    with pytest.raises(ValueError, match="crops 224"):
        batches(images, 4, Preprocessing(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3))
    with pytest.raises(ValueError, match="batch_size"):
        batches(images, 0, PLAIN)


def test_shared_cifar10_balanced_subset(data_root):
    cifar = Preprocessing(resize=None, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    images = load_images("cifar10", "test", data_root, cifar, limit=200, progress=False)
    classes = sorted(p.name for p in (data_root / "cifar10" / "test").iterdir())
    assert images.files == [f"{c}/{k:04d}.jpg" for c in classes for k in range(20)]
    assert images.labels.bincount().tolist() == [20] * 10


def test_shared_imagenet_subset_folder_gets_imagenet_indices(tmp_path, data_root):
    for wnid in WNIDS:
        (tmp_path / wnid).symlink_to(data_root.resolve() / "imagenet-sample" / wnid)
    prep = Preprocessing(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    images = load_images("imagenet", tmp_path, data_root, prep, progress=False)
    expected = json.loads((data_root / "imagenet_wnid_to_idx.json").read_text())["wnid_to_idx"]
    assert images.labels.tolist() == [expected[w] for w in WNIDS] == [0, 217, 701]
    assert images.images.shape == (3, 3, 224, 224)
