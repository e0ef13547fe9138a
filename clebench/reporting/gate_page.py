"""The regression gate on the report page: the check's table, its reasons, and a gallery of the images whose
quantized top-1 prediction changed against the baseline (thumbnail, label, class before -> after).

The images are the evaluation images the sweep used: the data set, split, limit and seed of the results folder's
configuration, loaded with each model's preprocessing (`clebench.data.datasets.load_images`, which selects the same
class-balanced subset), so index i of predictions.npz is image i here.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from clebench.errors import UserError
from clebench.reporting import html
from clebench.reporting.regression import STATUSES, CheckResult, read_baseline, results_config
from clebench.sweep import results
from clebench.sweep.results import KEY_COLUMNS, RowKey

MAX_THUMBNAILS = 24  # per results row; the rest are counted
THUMBNAIL_PIXELS = 96  # longest side of a thumbnail; smaller images (CIFAR's 32 px) are kept as they are


def gate_html(result: CheckResult, gallery: list[str]) -> list[str]:
    """The gate's section: verdict, per-row table (regressions highlighted), failures and notes, then `gallery`."""
    counts = result.table["status"].value_counts()
    summary = ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts) or "no rows"
    verdict = '<span class="pass">PASS</span>' if result.ok else '<span class="fail">FAIL</span>'
    table = result.table
    header = [*KEY_COLUMNS, "baseline top-1 (%)", "current top-1 (%)", "change (points)", "images changed",
              "right ↔ wrong", "status"]
    rows = [[*row[KEY_COLUMNS], _percent(row.baseline_top1), _percent(row.current_top1),
             "" if math.isnan(row.delta) else f"{row.delta:+.2f}", _count(row.changed), _count(row.changed_correctness),
             row.status] for _, row in table.iterrows()]
    fragments = [
        "<h2>Regression gate (<code>clebench check</code>)</h2>",
        f"<p>{verdict} ({html.escape(summary)}); a row fails when its quantized top-1 drops by more than "
        f"{result.tolerance:g} points and more than {result.min_images} images.</p>",
        html.table(header, rows, [False] * 4 + [True] * 5 + [False], row_classes=list(table["status"])),
    ]
    fragments += [f'<p class="problem">FAIL: {html.escape(p)}</p>' for p in result.problems]
    fragments += [f'<p class="note">note: {html.escape(n)}</p>' for n in result.notes]
    return fragments + gallery


def _percent(value: float) -> str:
    return html.MISSING if math.isnan(value) else f"{value:.2f}"


def _count(value: float) -> str:
    return html.MISSING if math.isnan(value) else f"{value:.0f}"


def flipped_gallery(result: CheckResult, results_dir: Path, baseline_json: Path, data_root: str | None) -> list[str]:
    """Per row with changed predictions: a thumbnail per changed image (up to MAX_THUMBNAILS), its label and its class
    before -> after; without thumbnails (and saying why) when the images cannot be loaded."""
    before = read_baseline(baseline_json).predictions
    after = results.read_predictions(Path(results_dir) / results.PREDICTIONS_FILE)
    changed = result.table[result.table["changed"].fillna(0) > 0]
    fragments = ["<h3>Images whose prediction changed against the baseline</h3>"]
    if changed.empty:
        reason = ("no image changed its quantized top-1 class" if result.table["changed"].notna().any()
                  else "not counted: the results folder or the baseline holds no per-image predictions")
        return fragments + [f'<p class="note">{html.escape(reason)}.</p>']
    fragments.append('<p class="note">Thumbnail, index in the evaluation set, label, then class before → after '
                     '(red: the change made it wrong, green: right).</p>')
    meta_path = Path(results_dir) / results.META_FILE
    loader = _EvalImages(results_config(results_dir), data_root, results.read_json(meta_path) if meta_path.is_file()
                         else {})
    for values in changed[KEY_COLUMNS].itertuples(index=False):
        key = RowKey(*values)
        old, new = before[results.prediction_name(key, "quant")], after[results.prediction_name(key, "quant")]
        labels = after.get(results.labels_name(key.model, key.dataset), before.get(results.labels_name(key.model, key.dataset)))
        indices = np.flatnonzero(old != new)
        fragments.append(f"<h4>{html.escape('/'.join(key))}: {len(indices)} image(s) changed</h4>")
        images, names, why = loader.for_model(key.model)
        if why:
            fragments.append(f'<p class="note">No thumbnails: {html.escape(why)}</p>')
        cards = [_card(int(i), int(labels[i]), int(old[i]), int(new[i]), images, names) for i in indices[:MAX_THUMBNAILS]]
        fragments.append(f'<div class="gallery">{"".join(cards)}</div>')
        if len(indices) > MAX_THUMBNAILS:
            fragments.append(f'<p class="note">{len(indices) - MAX_THUMBNAILS} more not shown.</p>')
    return fragments


def _card(index: int, label: int, old: int, new: int, images, names: dict[int, str]) -> str:
    name = lambda c: names.get(c, str(c))  # noqa: E731
    outcome = "problem" if old == label else "pass" if new == label else ""
    thumbnail = (f'<img src="{html.png_data_uri(thumbnail_png(images[index]))}" alt="image {index}">'
                 if images is not None else "")
    return (f"<figure>{thumbnail}<figcaption>#{index} {html.escape(name(label))}<br>"
            f'<span class="{outcome}">{html.escape(name(old))} → {html.escape(name(new))}</span></figcaption></figure>')


def thumbnail_png(image) -> bytes:
    """A uint8 [3, H, W] image as PNG bytes, downscaled to THUMBNAIL_PIXELS on its longest side if larger."""
    picture = Image.fromarray(np.ascontiguousarray(np.asarray(image).transpose(1, 2, 0)))
    if max(picture.size) > THUMBNAIL_PIXELS:
        picture.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


class _EvalImages:
    """The evaluation images of a results folder's config, loaded once per preprocessing: each model's as meta.json
    records it (else the model's default), an imagefolder's from the root and classes it records."""

    def __init__(self, config: dict | None, data_root: str | None, meta: dict) -> None:
        self.config, self.data_root, self.meta, self._loaded = config, data_root, meta, {}

    def for_model(self, model: str) -> tuple[object, dict[int, str], str]:
        """(uint8 [N, 3, H, W] images or None, class index -> name, why there are no images or '')."""
        from clebench.data import datasets
        from clebench.models import Preprocessing, model_preprocessing

        if self.config is None:
            return None, {}, "the results folder records no configuration (meta.json or config.toml)"
        data = self.config.get("data", {})
        try:
            recorded = self.meta.get("preprocessing", {}).get(model)
            preprocessing = Preprocessing(**recorded) if recorded else model_preprocessing(model)
            folder = self.meta.get("imagefolder") or {}
            key = (preprocessing.resize_size, preprocessing.crop, preprocessing.interpolation)
            if key not in self._loaded:
                image_set = datasets.load_images(data["dataset"], data.get("eval_split", "test"),
                                                 folder.get("root", self.data_root), preprocessing,
                                                 limit=data.get("limit"), seed=data.get("seed"),
                                                 skip_unreadable=data.get("skip_unreadable", False),
                                                 classes=folder.get("classes"), progress=False)
                self._loaded[key] = (image_set.images, class_names(image_set.files, image_set.labels.tolist()))
        except (UserError, FileNotFoundError, ValueError, KeyError) as error:
            return None, {}, f"the evaluation images cannot be loaded ({error}); pass --data-root or set CLEBENCH_DATA"
        return (*self._loaded[key], "")


def class_names(files: list[str], labels: list[int]) -> dict[int, str]:
    """Class index -> the class folder a file of that class is in ('cat/0001.jpg' -> 'cat'); {} for flat files."""
    return {label: Path(file).parts[0] for file, label in zip(files, labels) if len(Path(file).parts) > 1}


def check_section(result: CheckResult, results_dir: Path, baseline_json: Path, data_root: str | None) -> list[str]:
    """`gate_html` with the flipped-images gallery, for `clebench check --html`."""
    return gate_html(result, flipped_gallery(result, results_dir, baseline_json, data_root))

