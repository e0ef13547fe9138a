"""Benchmark of the data path: decoding, the image cache, memory, and evaluation against a bare GPU-resident loop.

    PYTHONPATH=$PWD python scripts/benchmarks/bench_data.py --data ../shared/data/imagenet-sample
    PYTHONPATH=$PWD python scripts/benchmarks/bench_data.py --replicate 50000 --eval efficientnet_lite0 --eval-limit 2000
    PYTHONPATH=$PWD python scripts/benchmarks/bench_data.py --full-size --repeat 3       # ~500x375 JPEGs, as ImageNet val

Decoders are interleaved and repeated (best of --repeat), so the ratios hold on a noisy machine:
``old`` is the previous loader (PIL in a thread pool, torch ops per image), ``threads`` / ``processes`` are
clebench.data.decode's pools (pixel-identical to ``old``), ``decode_jpeg`` is torchvision.io (libjpeg-turbo, tensor
resize; not pixel-identical, shown for reference). Then a cold load_images into an empty cache, a cache-hit open,
the peak anonymous memory (RssAnon, sampled), and with --eval the evaluation throughput over ``batches`` against
a bare loop over the same uint8 images already on the device. Replicas and caches live in a temporary folder that
is deleted at the end.

Output: prints the figures to stdout (results/gpu/data_*.log are such runs); writes no file except --keep's copies
and --cache-dir's cache.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torchvision
import torchvision.io as tvio
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from clebench import evaluate, graph, timing

from clebench.data import datasets

from clebench.sweep import steps
from clebench.data.decode import decode_into, default_workers
from clebench.models import Preprocessing, load_model, model_preprocessing
from clebench.precision import fp32_precision
from clebench.sweep.prepare import calibrated_sim

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "imagenet-sample"
GEOMETRY = Preprocessing(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)


class PeakAnon:
    """Peak RssAnon of this process in bytes, sampled every 20 ms from /proc/self/status."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> PeakAnon:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*/*") if p.is_file() or p.is_symlink())


def replicate(sample: Path, count: int, into: Path) -> Path:
    """An ImageNet-style folder of ``count`` symlinks cycling through the sample's files, same wnid folders."""
    files = files_of(sample)
    for k in range(count):
        source = files[k % len(files)]
        folder = into / source.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"r{k // len(files):04d}_{source.name}").symlink_to(source.resolve())
    return into


def full_size(sample: Path, into: Path) -> Path:
    """The sample re-encoded at 500x375 (landscape) / 375x500, quality 90: the size of ImageNet's val JPEGs."""
    for source in files_of(sample):
        with Image.open(source) as image:
            size = (500, 375) if image.width >= image.height else (375, 500)
            (into / source.parent.name).mkdir(parents=True, exist_ok=True)
            image.convert("RGB").resize(size, Image.BICUBIC).save(into / source.parent.name / source.name, quality=90)
    return into


def old_decoder(paths: list[Path], workers: int) -> None:
    """The previous loader's hot path: PIL in threads, torch tensors per image, torch's default intra-op threads."""
    out = torch.empty((len(paths), 3, 224, 224), dtype=torch.uint8)

    def one(row: int) -> None:
        with Image.open(paths[row]) as image:
            rgb = image.convert("RGB")
        rgb = TF.resize(rgb, 256, interpolation=InterpolationMode.BILINEAR)
        out[row] = TF.pil_to_tensor(TF.center_crop(rgb, 224))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(paths))))


def decode_jpeg(paths: list[Path], workers: int) -> None:
    out = torch.empty((len(paths), 3, 224, 224), dtype=torch.uint8)

    def one(row: int) -> None:
        image = tvio.decode_jpeg(tvio.read_file(str(paths[row])), mode=tvio.ImageReadMode.RGB)
        out[row] = TF.center_crop(TF.resize(image, 256, antialias=True), 224)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(len(paths))))
    finally:
        torch.set_num_threads(threads)


def bench_decoders(paths: list[Path], workers: int, repeat: int, scratch: Path) -> dict[str, float]:
    target = scratch / "decoded.npy"

    def pool(processes: bool):
        return lambda: decode_into(target, len(paths), GEOMETRY, open_image=lambda i: Image.open(paths[i]),
                                   paths=paths, workers=workers, processes=processes, progress=False)

    variants = {"old": lambda: old_decoder(paths, workers), "threads": pool(False), "processes": pool(True),
                "decode_jpeg": lambda: decode_jpeg(paths, workers)}
    times = timing.interleaved(variants, repeat)
    target.unlink(missing_ok=True)
    return {name: len(paths) / min(seconds) for name, seconds in times.items()}


def bench_cache(folder: Path, cache: Path) -> dict[str, float]:
    root, split = folder.parent, folder.name
    with PeakAnon() as cold_memory:
        cold, images = timing.timed(lambda: datasets.load_images("imagenet", split, root, GEOMETRY, cache_dir=cache,
                                                                  progress=False, wnid_to_idx=wnid_map(folder)))
    del images
    with PeakAnon() as hit_memory:
        hit, images = timing.timed(lambda: datasets.load_images("imagenet", split, root, GEOMETRY, cache_dir=cache,
                                                                 progress=False, wnid_to_idx=wnid_map(folder)))
        checksum = sum(int(x.sum()) for x, _ in datasets.batches(images, 1000, GEOMETRY))  # touch every pixel
    return {"images": len(images), "cold_s": cold, "cold_img_per_s": len(images) / cold, "hit_s": hit,
            "cold_peak_anon_gb": cold_memory.peak / 1e9, "hit_and_stream_peak_anon_gb": hit_memory.peak / 1e9,
            "checksum": checksum}


def wnid_map(folder: Path) -> dict[str, int]:
    return {w: i for i, w in enumerate(sorted(p.name for p in folder.iterdir() if p.is_dir()))}


def bench_eval(model_name: str, folder: Path, cache: Path, limit: int, batch_size: int, device: torch.device,
               repeat: int, untrained: bool, quant: str | None) -> dict[str, float]:
    """evaluate() over batches (from the cache mapping or to_device, NCHW or channels_last) against a bare loop on
    device data, of the FP32 model or (quant given) its calibrated QuantSim."""
    preprocessing = model_preprocessing(model_name)
    images = datasets.load_images("imagenet", folder.name, folder.parent, preprocessing, limit=limit, cache_dir=cache,
                              progress=False, wnid_to_idx=wnid_map(folder))
    model = torchvision.models.get_model(model_name) if untrained else load_model(model_name)
    if quant is not None:  # BN folded, calibrated on the first batch
        state = steps.PipelineState(graph.prepare_model(model).eval())
        steps.apply_fp32_step("bn_fold", state)
        model = calibrated_sim(state, "bn_fold", quant, [next(datasets.batches(images, batch_size, preprocessing))]).model
    model = model.to(device).eval()
    resident = datasets.to_device(images, device)
    mean = torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1)
    on_device = images.images.to(device)

    def bare() -> None:
        with torch.inference_mode():
            for start in range(0, len(on_device), batch_size):
                model(on_device[start:start + batch_size].float().div_(255).sub_(mean).div_(std)).argmax(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def harness(image_set: datasets.ImageSet, channels_last: bool = False):
        return lambda: evaluate(model, datasets.batches(image_set, batch_size, preprocessing, device), device,
                                progress=False, channels_last=channels_last)

    variants = {"bare loop (device-resident)": bare, "evaluate(batches) from mapping": harness(images),
                "evaluate(batches) after to_device": harness(resident),
                "evaluate(batches) after to_device, channels_last": harness(resident, channels_last=True)}
    with fp32_precision():
        times = timing.interleaved(variants, repeat)
    return {name: len(images) / min(seconds) for name, seconds in times.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("--data", type=Path, default=SAMPLE, help="ImageNet-style folder (default: the shared sample)")
    parser.add_argument("--replicate", type=int, help="symlink the folder's files up to this many images first")
    parser.add_argument("--full-size", action="store_true", help="re-encode the images at 500x375 first")
    parser.add_argument("--decode-images", type=int, default=2000, help="images for the decoder comparison")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--eval", metavar="MODEL", help="also time evaluation of this model (e.g. efficientnet_lite0)")
    parser.add_argument("--untrained", action="store_true", help="--eval a torchvision architecture with random "
                        "weights (throughput only; for machines that cannot download the weights)")
    parser.add_argument("--quant", help="time the QuantSim under this preset (e.g. w8a8_per_tensor_minmax) instead "
                        "of the FP32 model")
    parser.add_argument("--eval-limit", type=int, default=1000, help="images for the evaluation timing")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache-dir", type=Path, help="image cache folder (default: a temporary one); give an "
                        "empty folder, the cold load must decode")
    parser.add_argument("--keep", type=Path, help="build the replica / full-size copy here and keep it")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="clebench-bench-data-"))
    copies = args.keep or scratch
    cache_dir = args.cache_dir or scratch / "cache"
    try:
        folder = args.data.resolve()
        if args.full_size:
            folder = full_size(folder, copies / "full" / folder.name)
        if args.replicate:
            folder = replicate(folder, args.replicate, copies / "replica" / folder.name)
        paths = files_of(folder)
        for path in paths[:args.decode_images]:
            path.read_bytes()  # page cache warm, as in a sweep's second pass over the files
        print(f"{len(paths)} images in {folder}; {args.workers} workers; best of {args.repeat}")
        rates = bench_decoders(paths[:args.decode_images], args.workers, args.repeat, scratch)
        print(f"\ndecoding {min(len(paths), args.decode_images)} images (img/s, and against `old`):")
        for name, rate in rates.items():
            print(f"  {name:12s} {rate:8.0f}  {rate / rates['old']:5.2f}x")
        cache = bench_cache(folder, cache_dir)
        print(f"\nload_images of all {cache['images']} images: cold {cache['cold_s']:.1f} s "
              f"({cache['cold_img_per_s']:.0f} img/s, peak RssAnon {cache['cold_peak_anon_gb']:.2f} GB); cache hit "
              f"{cache['hit_s']:.2f} s; hit + streaming every batch: peak RssAnon "
              f"{cache['hit_and_stream_peak_anon_gb']:.2f} GB")
        if args.eval:
            throughput = bench_eval(args.eval, folder, cache_dir, args.eval_limit, args.batch_size,
                                    torch.device(args.device), args.repeat, args.untrained, args.quant)
            bare = throughput["bare loop (device-resident)"]
            print(f"\n{args.eval} {args.quant or 'FP32'} on {args.device}, {args.eval_limit} images, batch {args.batch_size} (img/s):")
            for name, rate in throughput.items():
                print(f"  {name:50s} {rate:8.0f}  {rate / bare:5.0%} of the bare loop")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
