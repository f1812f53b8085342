"""Decoding of a request's `data` bytes: a PNG image or a `.npy` array.

The model server and the TorchServe handler share this decoder, so both accept the same
inputs and reject bad ones with the same messages. It lives in the client package, which
the model server imports (never the other way round), and knows only bytes and numpy
arrays.

    PNG   one image; any mode is converted to grayscale, a square image of another size is
          resized to the model's (H, W); pixel values 0..255 become [0, 1].
    .npy  one sample (H, W) or (C, H, W), or a batch (N, H, W) or (N, C, H, W);
          uint8 (0..255) or float (finite, in [0, 1]).
"""

from __future__ import annotations

import io

import numpy as np
from stealguard.server.errors import InvalidInput

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
MAX_IMAGE_PIXELS = 4096 * 4096  # larger images are refused before they are decoded


class InputError(InvalidInput, ValueError):
    """The request's input cannot be used; the message says what was wrong and what fits."""


def decode_input(data: bytes, input_shape: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    """Decode PNG or `.npy` bytes into a float32 batch shaped (N, *input_shape) in [0, 1].

    Returns (batch, is_batch): is_batch is False when the request held one sample, so the
    answer is one probability vector rather than a list of them. Raises InputError naming
    the problem (unknown format, undecodable bytes, wrong shape, dtype or value range)."""
    data = bytes(data)
    if not data:
        raise InputError("input 'data' is empty: send PNG or .npy bytes")
    if data.startswith(PNG_MAGIC):
        return decode_png(data, input_shape)[None], False
    if data.startswith(NPY_MAGIC):
        return decode_npy(data, input_shape)
    raise InputError(
        f"input 'data' is neither a PNG image nor a .npy array (starts with {data[:8]!r}); "
        "send PNG bytes or the bytes of numpy.save"
    )


def decode_png(data: bytes, input_shape: tuple[int, ...]) -> np.ndarray:
    """Decode one PNG into a float32 array of `input_shape` (C, H, W) in [0, 1]."""
    from PIL import Image

    channels, height, width = _image_shape(input_shape)
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise InputError(
                f"PNG is {image.width}x{image.height}: too large "
                f"(at most {MAX_IMAGE_PIXELS} pixels; the model takes {width}x{height})"
            )
        image.load()
    except InputError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt files
        raise InputError(f"input 'data' is not a decodable PNG: {exc}") from None
    if image.width * height != image.height * width:
        raise InputError(
            f"PNG is {image.width}x{image.height}; the model takes {width}x{height} images "
            "(other sizes are resized only when the aspect ratio matches)"
        )
    mode = "L" if channels == 1 else "RGB"
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # transparent pixels count as background (black), as in MNIST
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.round(wide * 255.0 / 65535.0).astype(np.uint8))
    image = image.convert(mode)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels.reshape(height, width, channels).transpose(2, 0, 1).copy()


def decode_npy(data: bytes, input_shape: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    """Decode `.npy` bytes into a float32 batch (N, *input_shape) in [0, 1] and is_batch."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise InputError(f"input 'data' is not a readable .npy array: {exc}") from None
    batch, is_batch = _as_batch(array, tuple(input_shape))
    return _to_unit_float(batch), is_batch


def _image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise InputError(
            f"this model takes input of shape {tuple(input_shape)}, not images: send a .npy array"
        )
    return tuple(int(s) for s in input_shape)  # type: ignore[return-value]


def _as_batch(array: np.ndarray, input_shape: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    shape = tuple(array.shape)
    squeezed = input_shape[1:] if len(input_shape) == 3 and input_shape[0] == 1 else None
    if shape == input_shape or (squeezed is not None and shape == squeezed):
        return array.reshape((1, *input_shape)), False
    if shape[1:] == input_shape or (squeezed is not None and shape[1:] == squeezed):
        if shape[0] == 0:
            raise InputError("the .npy batch is empty (0 samples)")
        return array.reshape((shape[0], *input_shape)), True
    accepted = [input_shape, ("N", *input_shape)]
    if squeezed is not None:
        accepted[1:1] = [squeezed, ("N", *squeezed)]
    accepted_text = ", ".join(str(s).replace("'", "") for s in accepted)
    raise InputError(f"the .npy array has shape {shape}; this model takes {accepted_text}")


def _to_unit_float(batch: np.ndarray) -> np.ndarray:
    if batch.dtype == np.uint8:
        return batch.astype(np.float32) / 255.0
    if batch.dtype.kind != "f":
        raise InputError(
            f"the .npy array has dtype {batch.dtype}; send uint8 (0..255) or float in [0, 1]"
        )
    values = batch.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        row = int(np.argwhere(~finite)[0][0])
        raise InputError(f"sample {row}: the .npy array holds a value that is not finite")
    outside = (values < 0.0) | (values > 1.0)
    if outside.any():
        row = int(np.argwhere(outside)[0][0])
        low, high = float(values[row].min()), float(values[row].max())
        raise InputError(
            f"sample {row}: values must be in [0, 1] for a float array "
            f"(found {low:g}..{high:g}); send uint8 for 0..255 pixels"
        )
    return values
