"""Arrays as heatmaps, inline PNG images (`data:` URIs) with a diverging colour map.

Zero is white, positive red, negative blue (matplotlib's RdBu_r), full colour at ±scale, the
scale given by the caller so that several arrays share one: a delta that shrinks through a
layer then looks fainter than the one that arrived. One image per array: its channels side by
side (the first `MAX_CHANNELS`), a grey line between them; a flat vector wrapped into rows
of `ROW`; a 1-D signal `(length, channels)` as one row per channel.
"""
from __future__ import annotations

import base64
import io
from html import escape
from typing import NamedTuple, Sequence

import numpy as np

MAX_CHANNELS = 8
ROW = 32
COLOUR_MAP = "RdBu_r"
CHOICES = "tab10"  # a qualitative map, for which of a few things won
GAP = (0.45, 0.45, 0.45, 1.0)  # between channels, and the unused end of a wrapped vector


class Picture(NamedTuple):
    """An array laid out in 2-D (NaN where nothing is drawn), what it shows, and the larger
    side of one of its maps (which sets the pixel size)."""
    values: np.ndarray
    shown: str
    side: int


def layout(array: np.ndarray) -> Picture:
    """One example's array as a 2-D picture.

    Args:
      array: `(n,)`, `(length, channels)` or `(*spatial, channels)` with 2 or 3 spatial axes
        (3: the first two merged into rows).
    """
    array = np.asarray(array, np.float64)
    if array.ndim == 1:
        width = min(array.size, ROW)
        padded = np.full(-(-array.size // ROW) * width, np.nan)
        padded[:array.size] = array
        shown = f"{array.size} values" + (f", {ROW} a row" if array.size > ROW else "")
        return Picture(padded.reshape(-1, width), shown, width)
    if array.ndim == 2:
        return Picture(array.T, f"{array.shape[1]} channels as rows, {array.shape[0]} "
                                f"positions", max(array.shape))
    channels = array.shape[-1]
    count = min(channels, MAX_CHANNELS)
    maps = [array[..., c].reshape(-1, array.shape[-2]) for c in range(count)]
    height, width = maps[0].shape
    values = np.full((height, count * (width + 1) - 1), np.nan)
    for c, each in enumerate(maps):
        values[:, c * (width + 1):c * (width + 1) + width] = each
    shown = (f"channels 0-{count - 1} of {channels}, left to right" if channels > count
             else f"{channels} channel{'s' if channels > 1 else ''}")
    return Picture(values, shown, max(height, width))


def _uri(rgba: np.ndarray) -> str:
    from matplotlib.image import imsave

    buffer = io.BytesIO()
    imsave(buffer, rgba, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def png_uri(picture: np.ndarray, scale: float) -> str:
    """The picture coloured on ±scale, NaN grey, as a `data:image/png;base64,` URI."""
    from matplotlib import colormaps

    normalised = 0.5 + 0.5 * np.clip(picture / scale, -1, 1) if scale > 0 else 0.5 + 0 * picture
    rgba = colormaps[COLOUR_MAP](np.nan_to_num(normalised, nan=0.5))
    rgba[np.isnan(picture)] = GAP
    return _uri(rgba)


def _figure(uri: str, shape, side: int, caption: str, extra: str = "", across: int = 112
            ) -> str:
    """An `<img>` of `shape` with about `across` screen pixels over `side` values (2 to 20
    a value), and its caption."""
    size = int(np.clip(across // max(side, 1), 2, 20))
    height, width = shape
    return (f'<figure class="map"><img src="{uri}" width="{width * size}" '
            f'height="{height * size}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}{extra}</figcaption></figure>")


def heatmap(array: np.ndarray, scale: float, caption: str) -> str:
    """A `<figure>`: the array's heatmap on ±scale, about 112 screen pixels across one map
    (192 across a vector's row), under `caption` and what it shows."""
    picture = layout(array)
    return _figure(png_uri(picture.values, scale), picture.values.shape, picture.side, caption,
                   f' <span class="shown">({escape(picture.shown)})</span>',
                   192 if np.ndim(array) == 1 else 112)


def categorical(indices: np.ndarray, labels: Sequence[int], caption: str) -> str:
    """A `<figure>` of a map of choices (`indices` into `labels`; 1-D as one row, more axes
    than two merged into rows), one colour per choice, with its legend."""
    from matplotlib import colormaps

    picture = np.reshape(indices, (-1, np.shape(indices)[-1]))
    colours = colormaps[CHOICES]
    legend = "".join(
        '<span class="swatch" style="background: rgb({}, {}, {})"></span>{} '.format(
            *(round(255 * v) for v in colours(n % colours.N)[:3]), escape(f"map {label}"))
        for n, label in enumerate(labels))
    return _figure(_uri(colours(picture % colours.N)), picture.shape, max(picture.shape),
                   caption, f'<br><span class="legend">{legend}</span>')


def colour_bar(scale: float) -> str:
    """The colour scale as a CSS gradient from -scale through 0 to +scale (no image)."""
    from matplotlib import colormaps

    colours = colormaps[COLOUR_MAP]
    stops = ", ".join(
        "rgb({}, {}, {})".format(*(round(255 * c) for c in colours(t)[:3]))
        for t in np.linspace(0, 1, 9))
    return (f'<div class="bar"><span>{-scale:.3g}</span><span class="ramp" '
            f'style="background: linear-gradient(to right, {stops})"></span>'
            f"<span>{scale:.3g}</span></div>")
