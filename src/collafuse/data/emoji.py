"""Colour emoji as a small RGB data set that installs offline (``data.dataset = "emoji"``).

Two Debian packages hold everything: ``fonts-noto-color-emoji`` (the glyphs, as colour bitmaps) and
``unicode-data`` (``emoji-test.txt``, which lists every emoji with its group and status). Every *fully-qualified*
emoji of Unicode 15.0 is drawn once, 3,655 of them, and its Unicode group is its class:

    People & Body 2,148, Flags 269, Objects 261, Symbols 223, Travel & Places 218, Smileys & Emotion 166,
    Animals & Nature 152, Food & Drink 133, Activities 85.

Skin-tone variants are kept: each is its own fully-qualified emoji and draws in its own colours (1,785 of
People & Body's 2,148 carry a skin-tone modifier, U+1F3FB..U+1F3FF). There is no official test split, so
``holdout`` keeps a fixed share per group.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .common import DataError, ImageSet, Splits, _check_shape, _fit_array, holdout

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")  # Debian fonts-noto-color-emoji
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")  # Debian unicode-data
# The classes, in the order emoji-test.txt lists its groups ("Component", the bare skin tones, is not a group of
# fully-qualified emoji).
EMOJI_GROUPS = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
                "Activities", "Objects", "Symbols", "Flags")
# Noto's colour bitmaps are 136 x 128 at 109 px, the one size the font carries (a CBDT font has fixed strikes).
_GLYPH_PX, _CANVAS = 109, (136, 128)


def parse_emoji_test(text: str) -> list[tuple[str, int]]:
    """The fully-qualified emoji of an ``emoji-test.txt`` with their group's class id (``EMOJI_GROUPS``).

    Lines look like ``1F600 ; fully-qualified # 😀 E1.0 grinning face`` under ``# group: Smileys & Emotion``.
    """
    out, group = [], None
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            continue
        if not line.strip() or line.startswith("#"):
            continue
        codes, rest = line.split(";", 1)
        if rest.split("#", 1)[0].strip() != "fully-qualified" or group not in EMOJI_GROUPS:
            continue
        out.append(("".join(chr(int(h, 16)) for h in codes.split()), EMOJI_GROUPS.index(group)))
    return out


def render(emoji: list[str], font_path: Path = EMOJI_FONT, size: int = 32) -> np.ndarray:
    """uint8 [N, size, size, 3]: each emoji drawn in colour on white at the font's native size, the 136 x 128
    canvas padded to a white square and shrunk (LANCZOS) to ``size``."""
    font = ImageFont.truetype(str(font_path), _GLYPH_PX)
    side = max(_CANVAS)
    out = np.empty((len(emoji), size, size, 3), dtype=np.uint8)
    for i, ch in enumerate(emoji):
        im = Image.new("RGB", (side, side), "white")
        ImageDraw.Draw(im).text(((side - _CANVAS[0]) // 2, (side - _CANVAS[1]) // 2), ch, font=font,
                                embedded_color=True)
        out[i] = np.asarray(im.resize((size, size), Image.LANCZOS))
    return out


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "collafuse"


def emoji_images(font_path: Path = EMOJI_FONT, test_path: Path = EMOJI_TEST, size: int = 32,
                 cache_dir: Path | None = None) -> ImageSet:
    """Every fully-qualified emoji at ``size`` x ``size`` RGB with its group as label, rendered once to a cache.

    The cache (``$XDG_CACHE_HOME/collafuse/emoji-<size>-<hash>.npz``) is keyed by the font's and the list's bytes,
    so an upgraded package renders anew; it is written atomically.

    Raises:
        DataError: a package's file is missing (naming the package to install).
    """
    for path, package in ((font_path, "fonts-noto-color-emoji"), (test_path, "unicode-data")):
        if not Path(path).is_file():
            raise DataError(f"data.dataset = 'emoji' needs '{path}' (allowed: install the Debian package "
                            f"{package}: apt-get install {package})")
    text = Path(test_path).read_text(encoding="utf-8")
    key = hashlib.sha256(Path(font_path).read_bytes() + text.encode()).hexdigest()[:16]
    cache = (cache_dir or _cache_dir()) / f"emoji-{size}-{key}.npz"
    rows = parse_emoji_test(text)
    labels = np.array([c for _, c in rows], dtype=np.int64)
    if cache.is_file():
        with np.load(cache) as z:
            images = z["images"]
    else:
        images = render([e for e, _ in rows], Path(font_path), size)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez(tmp, images=images)
        os.replace(tmp, cache)
    return ImageSet(images, labels, list(EMOJI_GROUPS))


def emoji(image_size: int, channels: int, test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """The emoji set rendered at ``image_size`` with ``channels`` 3 (or 1: converted to gray like any array
    source), split by ``holdout``: ``test_fraction`` of every group held out (0.2 by default, seed 0)."""
    _check_shape(image_size, channels)
    full = emoji_images(size=image_size)
    images = ImageSet(_fit_array(full.images, image_size, channels), full.labels, full.class_names)
    return holdout(images, test_fraction, seed)
