"""A labelled contact sheet: the reference row, then one row per condition."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
WARNING = (200, 0, 0)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType
        return ImageFont.load_default()


def _tile(image: torch.Tensor, scale: int) -> Image.Image:
    array = image.cpu().numpy().transpose(1, 2, 0)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    tile = Image.fromarray(np.ascontiguousarray(array))
    return tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)


def contact_sheet(
    rows: Mapping[str, torch.Tensor],
    *,
    columns: int = 8,
    scale: int = 3,
    title: str | None = None,
    gap: int = 4,
    flags: Mapping[str, str] | None = None,
) -> Image.Image:
    """``rows``: label → uint8 N×C×H×W (same N, H, W); the first ``columns`` images each.

    The first row is usually ``reference``; labels are drawn at the left of each row.
    ``flags``: label → a warning (e.g. the degeneracy guard's ``DEGENERATE (flat)``),
    drawn in red under the label, with a red frame around the row.
    """
    flags = dict(flags or {})
    labels = list(rows)
    if not labels:
        raise ValueError("a contact sheet needs at least one row")
    first = rows[labels[0]]
    n = min(columns, first.shape[0])
    height, width = first.shape[2] * scale, first.shape[3] * scale
    font = _font(14)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    small = _font(11)
    label_width = max(
        max(measure.textlength(label, font=font) for label in labels),
        max((measure.textlength(note, font=small) for note in flags.values()), default=0),
    ) + 2 * gap
    title_height = 24 if title else 0
    sheet = Image.new(
        "RGB",
        (
            int(label_width) + n * (width + gap) + gap,
            title_height + len(labels) * (height + gap) + gap,
        ),
        BACKGROUND,
    )
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((gap, gap), title, fill=INK, font=font)
    for row, label in enumerate(labels):
        top = title_height + gap + row * (height + gap)
        note = flags.get(label)
        text_top = top + max(0, height // 2 - (16 if note else 8))
        draw.text((gap, text_top), label, fill=WARNING if note else INK, font=font)
        if note:
            draw.text((gap, text_top + 17), note, fill=WARNING, font=small)
        for column in range(n):
            sheet.paste(
                _tile(rows[label][column], scale), (int(label_width) + column * (width + gap), top)
            )
        if note:
            left, right = int(label_width) - 2, int(label_width) + n * (width + gap) - gap + 1
            draw.rectangle((left, top - 2, right, top + height + 1), outline=WARNING, width=2)
    return sheet


def write_contact_sheet(
    path: str | Path,
    rows: Mapping[str, torch.Tensor],
    order: Sequence[str] | None = None,
    **options,
) -> Path:
    """Render :func:`contact_sheet` (rows in ``order`` if given) and save it as PNG."""
    if order is not None:
        rows = {label: rows[label] for label in order}
    path = Path(path)
    contact_sheet(rows, **options).save(path, format="PNG")
    return path
