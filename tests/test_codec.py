import numpy as np
import pytest
from stealguard.server.codec import CodecError, array_to_tensor, tensor_to_array
from stealguard.v1 import defense_pb2


def tensor(shape, dtype=defense_pb2.FLOAT32, data=None, np_dtype="<f4"):
    if data is None:
        data = np.zeros(int(np.prod(shape)), dtype=np_dtype).tobytes()
    return defense_pb2.Tensor(shape=shape, dtype=dtype, data=data)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(10,), (3, 10), (0, 10), (4, 1)])
def test_round_trip_keeps_shape_dtype_and_bytes(shape, dtype):
    array = np.random.default_rng(0).random(shape).astype(dtype)
    back = tensor_to_array(array_to_tensor(array))
    assert back.shape == shape and back.dtype == dtype
    assert back.tobytes() == array.tobytes()


def test_decoding_does_not_copy_the_message_bytes():
    message = array_to_tensor(np.ones((2, 3), np.float32))
    array = tensor_to_array(message)
    assert not array.flags.owndata and not array.flags.writeable


def test_unspecified_dtype_is_rejected():
    with pytest.raises(CodecError, match="DTYPE_UNSPECIFIED: set FLOAT32 or FLOAT64"):
        tensor_to_array(tensor([2], dtype=defense_pb2.DTYPE_UNSPECIFIED))


def test_unknown_dtype_value_is_rejected():
    with pytest.raises(CodecError, match="unknown value 7"):
        tensor_to_array(tensor([2], dtype=7))


def test_data_length_must_match_shape_times_dtype():
    with pytest.raises(CodecError, match=r"has 12 bytes but shape \[2, 2\] of float32 needs 16"):
        tensor_to_array(tensor([2, 2], data=b"\0" * 12))


@pytest.mark.parametrize("shape", [[], [1, 2, 3]])
def test_shape_must_have_one_or_two_dimensions(shape):
    with pytest.raises(CodecError, match=r"expected \[classes\] or \[rows, classes\]"):
        tensor_to_array(tensor(shape, data=b""))


def test_negative_dimension_is_rejected():
    with pytest.raises(CodecError, match="negative dimension"):
        tensor_to_array(tensor([-1, 2], data=b""))


def test_rows_without_classes_are_rejected():
    with pytest.raises(CodecError, match="no classes"):
        tensor_to_array(tensor([3, 0], data=b""))


def test_huge_dimensions_are_rejected_without_allocating():
    with pytest.raises(CodecError, match="needs"):
        tensor_to_array(tensor([2**40, 2**20], data=b"\0" * 8))


def test_max_rows_is_enforced_with_the_limit_in_the_message():
    with pytest.raises(CodecError, match="5 rows: at most 4 per request"):
        tensor_to_array(tensor([5, 2]), max_rows=4)


def test_big_endian_input_is_encoded_little_endian():
    array = np.array([0.25, 0.75], dtype=">f8")
    message = array_to_tensor(array)
    assert message.data == np.array([0.25, 0.75], "<f8").tobytes()


def test_integer_arrays_cannot_be_encoded():
    with pytest.raises(CodecError, match="only float32 and float64"):
        array_to_tensor(np.array([0, 1]))
