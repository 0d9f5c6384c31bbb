"""Reading images that users give us: paths, bytes, PIL images or arrays, hardened against bad input.

User photos get their EXIF orientation applied (dataset images never do: their size must match
the annotation file). Every problem is an :class:`ImageError` with one sentence.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray]


class ImageError(ValueError):
    """An image that cannot be used; the message says why."""


def load_image(src: ImageInput, name: str | None = None) -> Image.Image:
    """Any supported input -> an RGB PIL image, upright as displayed.

    Args:
        src: a file path, the bytes of an encoded image, a PIL image, or an HxW / HxWx3 / HxWx4
            uint8 array.
        name: how to call the image in error messages (defaults to the path).
    Raises:
        ImageError: missing, empty, corrupt or non-image file; a decompression bomb (more pixels
            than ``PIL.Image.MAX_IMAGE_PIXELS``); an array of the wrong shape or type.
    """
    if isinstance(src, np.ndarray):
        return _from_array(src)
    if isinstance(src, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(src))
    if isinstance(src, (str, Path)):
        path = Path(src)
        name = name or str(path)
        if path.is_dir():
            raise ImageError(f"{name} is a directory, not an image file; give the path of one image")
        if not path.is_file():
            raise ImageError(f"image {name} does not exist")
        data = path.read_bytes()
    elif isinstance(src, (bytes, bytearray)):
        data, name = bytes(src), name or "the uploaded image"
    else:
        raise ImageError(f"cannot read an image from a {type(src).__name__}; give a path, bytes, "
                         "a PIL image or a uint8 array")
    if not data:
        raise ImageError(f"{name} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; we refuse the whole range.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name} has more than {Image.MAX_IMAGE_PIXELS:,} pixels; "
                         "refusing it as a possible decompression bomb") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name} is corrupt or truncated ({e})") from None
    return _to_rgb(ImageOps.exif_transpose(img))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Greyscale, 16-bit, palette, RGBA, CMYK ... -> 8-bit RGB (alpha composited on white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 0 else 1.0
        img = Image.fromarray((arr / hi * 255.0).round().astype(np.uint8))
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = arr.min(), arr.max()
        img = Image.fromarray(((arr - lo) / (hi - lo if hi > lo else 1.0) * 255.0).round().astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB") if img.mode != "RGB" else img


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise ImageError(f"image arrays must be uint8, got {arr.dtype}")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)):
        if arr.size == 0:
            raise ImageError("the image array is empty")
        return _to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
    raise ImageError(f"image arrays must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")


def read_dataset_image(path: str | Path, height: int, width: int, check_only: bool = False) -> Image.Image:
    """A dataset image as stored: no EXIF rotation, since its size must match ``instances.json``.

    Args:
        path: the image file.
        height, width: the size ``instances.json`` gives; another size is an error.
        check_only: decode a JPEG at 1/8 scale (fast) to check that it is readable; the returned
            image is then that small version.
    Raises:
        FileNotFoundError: the file does not exist.
        ImageError: unreadable, or of another size.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.size != (width, height):
                raise ImageError(f"image {path} is {im.width}x{im.height} but instances.json says "
                                 f"{width}x{height}; the image or the annotation file is from another release")
            if check_only:
                im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"image {path} cannot be read ({e})") from None
