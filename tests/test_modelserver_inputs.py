"""The model server's input decoding, model store and command line, without processes."""

from __future__ import annotations

import io
import subprocess

import numpy as np
import pytest
from _modelserver_helpers import npy_bytes, png_bytes
from _procs import script
from PIL import Image
from stealguard.client.inputs import InputError, decode_input
from stealguard.modelserver.store import ManifestError, read_manifest, read_store

SHAPE = (1, 28, 28)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_grayscale_png_decodes_to_one_unit_range_sample():
    pixels = np.arange(28 * 28, dtype=np.float32).reshape(28, 28) % 256 / 255
    batch, is_batch = decode_input(png_bytes(pixels), SHAPE)
    assert not is_batch
    assert batch.shape == (1, 1, 28, 28) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0, 0], pixels, atol=0.5 / 255)


def test_rgb_png_is_converted_to_grayscale():
    image = Image.new("RGB", (28, 28), (255, 255, 255))
    batch, _ = decode_input(_png(image), SHAPE)
    np.testing.assert_allclose(batch, 1.0)


def test_transparent_png_pixels_count_as_black_background():
    image = Image.new("RGBA", (28, 28), (255, 255, 255, 0))
    image.putpixel((3, 5), (255, 255, 255, 255))
    batch, _ = decode_input(_png(image), SHAPE)
    assert batch[0, 0, 5, 3] == 1.0 and batch.sum() == 1.0


def test_larger_square_png_is_resized_to_the_model_input():
    image = Image.new("L", (56, 56), 255)
    batch, _ = decode_input(_png(image), SHAPE)
    assert batch.shape == (1, 1, 28, 28)
    np.testing.assert_allclose(batch, 1.0)


def test_non_square_png_is_rejected_with_its_size():
    with pytest.raises(InputError, match=r"PNG is 28x20; the model takes 28x28"):
        decode_input(_png(Image.new("L", (28, 20))), SHAPE)


def test_truncated_png_is_rejected_as_not_decodable():
    data = png_bytes(np.zeros((28, 28)))
    with pytest.raises(InputError, match="not a decodable PNG"):
        decode_input(data[:30], SHAPE)


def test_bytes_that_are_neither_png_nor_npy_are_rejected():
    with pytest.raises(InputError, match="neither a PNG image nor a .npy array"):
        decode_input(b"hello world", SHAPE)


def test_empty_data_is_rejected():
    with pytest.raises(InputError, match="empty"):
        decode_input(b"", SHAPE)


@pytest.mark.parametrize("shape, rows, is_batch", [
    ((28, 28), 1, False),
    ((1, 28, 28), 1, False),
    ((3, 28, 28), 3, True),
    ((3, 1, 28, 28), 3, True),
    ((1, 1, 28, 28), 1, True),
])
def test_npy_sample_and_batch_shapes(shape, rows, is_batch):
    array = np.full(shape, 0.25, dtype=np.float32)
    batch, batched = decode_input(npy_bytes(array), SHAPE)
    assert batch.shape == (rows, 1, 28, 28) and batched is is_batch
    np.testing.assert_array_equal(batch, 0.25)


def test_uint8_npy_is_scaled_to_unit_range():
    batch, _ = decode_input(npy_bytes(np.full((28, 28), 255, np.uint8)), SHAPE)
    np.testing.assert_array_equal(batch, 1.0)


def test_npy_of_the_wrong_shape_names_the_shapes_accepted():
    with pytest.raises(InputError, match=r"shape \(32, 32\); this model takes \(1, 28, 28\)"):
        decode_input(npy_bytes(np.zeros((32, 32), np.float32)), SHAPE)


def test_float_npy_outside_unit_range_names_the_sample():
    batch = np.zeros((4, 28, 28), np.float32)
    batch[2, 0, 0] = 255.0
    with pytest.raises(InputError, match=r"sample 2: values must be in \[0, 1\]"):
        decode_input(npy_bytes(batch), SHAPE)


def test_nan_in_npy_is_rejected():
    batch = np.zeros((2, 28, 28), np.float32)
    batch[1, 3, 3] = np.nan
    with pytest.raises(InputError, match="sample 1: .* not finite"):
        decode_input(npy_bytes(batch), SHAPE)


def test_integer_npy_other_than_uint8_is_rejected():
    with pytest.raises(InputError, match="dtype int64"):
        decode_input(npy_bytes(np.zeros((28, 28), np.int64)), SHAPE)


def test_pickled_npy_is_refused():
    array = np.array([{"a": 1}], dtype=object)
    with pytest.raises(InputError, match="not a readable .npy array"):
        decode_input(npy_bytes(array), SHAPE)


def test_empty_npy_batch_is_rejected():
    with pytest.raises(InputError, match="empty"):
        decode_input(npy_bytes(np.zeros((0, 28, 28), np.float32)), SHAPE)


def test_manifest_without_weights_names_the_file_and_field(tmp_path):
    path = tmp_path / "digits.yaml"
    path.write_text("architecture: simple\ninput_shape: [1, 8, 8]\nlabels: [a, b]\n")
    with pytest.raises(ManifestError, match=r"digits.yaml: field 'weights' is missing"):
        read_manifest(path)


def test_manifest_policy_defaults_to_the_model_name(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"")
    (tmp_path / "digits.yaml").write_text(
        "architecture: simple\nweights: w.pt\ninput_shape: [1, 8, 8]\nlabels: [a, b]\n")
    spec = read_store(tmp_path)["digits"]
    assert spec.policy == "digits" and spec.protected and spec.version == "1.0"


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([script("stealguard-modelserver"), *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_rejects_a_bad_timeout_in_one_line_with_exit_2():
    result = _run_cli("--sidecar-timeout", "-1")
    assert result.returncode == 2
    assert result.stderr.strip() == ("stealguard-modelserver: error: --sidecar-timeout: "
                                     "must be > 0 seconds, got -1.0")


def test_cli_rejects_an_unknown_sidecar_transport_in_one_line_with_exit_2():
    result = _run_cli("--sidecar-transport", "udp")
    assert result.returncode == 2
    assert result.stderr.strip() == ("stealguard-modelserver: error: --sidecar-transport: "
                                     "expected one of stream, unary, got 'udp'")


def test_cli_rejects_a_model_store_that_is_a_file(tmp_path):
    store = tmp_path / "store"
    store.write_text("")
    result = _run_cli("--model-store", str(store))
    assert result.returncode == 2
    assert "--model-store" in result.stderr and "is not a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_reports_a_broken_manifest_without_traceback(tmp_path):
    (tmp_path / "broken.yaml").write_text("architecture: [\n")
    result = _run_cli("--model-store", str(tmp_path), "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert "broken.yaml: cannot read the manifest" in result.stderr
    assert "Traceback" not in result.stderr
