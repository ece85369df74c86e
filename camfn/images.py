"""Image files: reading them as tensors (every PIL mode, with a pixel budget), writing pictures and arrays
atomically, and a folder of images as a data set.

:func:`load_image` checks the size the file declares *before* decoding (a decompression bomb declares billions
of pixels in a few bytes) and converts by mode with :func:`camfn.viz.as_image`: 16-bit gray scaled by 65535,
palette and gray images expanded to RGB, alpha composited over white. :func:`save_picture` and :func:`save_array`
write through :func:`camfn.files.write_bytes` (temporary file, then ``os.replace``: a symlink at the destination
is replaced, never followed).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from PIL import Image
    >>> from camfn.images import load_image
    >>> with tempfile.TemporaryDirectory() as d:
    ...     Image.fromarray(np.full((2, 3), 65535, dtype=np.uint16)).save(Path(d) / "white16.png")
    ...     load_image(Path(d) / "white16.png").shape, float(load_image(Path(d) / "white16.png").min())
    (torch.Size([3, 2, 3]), 1.0)
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from . import viz
from .errors import InputError
from .files import write_bytes

__all__ = ["IMAGE_SUFFIXES", "MAX_PIXELS", "ImageFolder", "load_image", "save_array", "save_picture"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
MAX_PIXELS = 1 << 26
"""Most pixels (width x height, 67 million: 8192 x 8192) an image read or a picture written may have."""


def load_image(path: Path, max_pixels: int = MAX_PIXELS) -> Tensor:
    """Read an image file as ``(3, H, W)`` in ``[0, 1]``; a clear :class:`~camfn.errors.InputError` when it cannot.

    Refuses files that declare more than ``max_pixels`` pixels before decoding them.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass image files (e.g. {path}/*.jpg)")
    try:
        with Image.open(path) as image:  # reads the header only; PIL refuses beyond 2 x its own limit
            w, h = image.size
            if w * h > max_pixels:
                raise InputError(
                    f"image {path} declares {w} x {h} pixels, more than camfn reads ({max_pixels}): a "
                    "decompression bomb or a huge image; downscale it first"
                )
            image.load()
            try:
                return viz.as_image(image)
            except InputError as e:
                raise InputError(f"image {path}: {e}") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"image {path} is too large to decode safely ({e}); downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, ImportError) as e:
        # ImportError: a library that patches PIL.Image.open to load a plugin (ultralytics: pi-heif) on failure
        if isinstance(e, InputError):
            raise
        raise InputError(
            f"cannot read image {path}: {type(e).__name__}: {e}. Pass a PNG, JPEG or other image PIL reads"
        ) from None


def save_picture(picture: Image.Image, path: Path) -> None:
    """Write a PIL image to ``path`` (format from the suffix) atomically."""
    buffer = io.BytesIO()
    picture.save(buffer, format=Image.registered_extensions().get(Path(path).suffix.lower(), "PNG"))
    write_bytes(Path(path), buffer.getvalue())


def save_array(array: np.ndarray, path: Path) -> None:
    """Write a numpy array to ``path`` as ``.npy`` (no pickled objects) atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_bytes(Path(path), buffer.getvalue())


class ImageFolder(torch.utils.data.Dataset):
    """Images under ``root`` (sorted paths), each resized to exactly ``size`` and normalised; optional labels.

    Labels come from subfolder names when every image sits in a subfolder and every subfolder name is a
    class name of the model (``classes``) or a class index; otherwise items carry no label. Symlinks are
    not followed out of ``root``.
    """

    def __init__(
        self,
        root: Path,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        classes: Sequence[str] | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"{root} is not a folder; pass 'shapes' or a folder of images")
        inside = root.resolve()
        self.paths = sorted(
            p
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and p.resolve().is_relative_to(inside)
        )
        if not self.paths:
            raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
        self.size, self.mean, self.std = size, mean, std
        folders = [p.parent.relative_to(root).as_posix() for p in self.paths]
        self.labels: list[int] | None = None
        if all(f != "." and "/" not in f for f in folders):
            if classes and all(f in classes for f in folders):
                self.labels = [list(classes).index(f) for f in folders]
            elif all(f.isdigit() for f in folders):
                self.labels = [int(f) for f in folders]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor | tuple[Tensor, int]:
        x = viz.preprocess(load_image(self.paths[i]), self.size, self.mean, self.std)[0]
        return x if self.labels is None else (x, self.labels[i])
