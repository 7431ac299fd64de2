"""emostream.loading: one place that turns model options into a loaded model."""

from __future__ import annotations

import pytest

from emostream.loading import ModelOptionsError, check_model_files, load_predictor, model_info, resolve_backend
from emostream.model import CheckpointError
from emostream.model_files import CHECKPOINT_ENV, default_checkpoint


def test_backend_follows_the_onnx_file_unless_named():
    assert resolve_backend(None, None) == "auto"  # int8 on a CPU (tests/test_int8.py), torch elsewhere
    assert resolve_backend(None, "m.onnx") == "onnx"
    assert resolve_backend("torch", None) == "torch"
    with pytest.raises(ModelOptionsError, match="backend must be one of"):
        resolve_backend("tflite", None)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"backend": "onnx"}, "needs --onnx"),
        ({"backend": "torch", "onnx": "m.onnx"}, "only used with --backend onnx"),
        ({"onnx": "m.onnx", "checkpoint": "ckpt"}, "does not apply"),
    ],
)
def test_options_that_do_not_fit_are_refused_before_loading(kwargs, message):
    with pytest.raises(ModelOptionsError, match=message):
        load_predictor(**kwargs)


def test_a_missing_shipped_model_names_the_environment_variable_and_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv(CHECKPOINT_ENV, str(tmp_path / "nowhere"))
    assert default_checkpoint() == tmp_path / "nowhere"
    with pytest.raises(CheckpointError) as err:
        load_predictor()
    message = str(err.value)
    assert "\n" not in message and CHECKPOINT_ENV in message and "emostream/checkpoints" in message
    with pytest.raises(ModelOptionsError, match=CHECKPOINT_ENV):
        check_model_files(backend="torch")


def test_check_model_files(shipped_checkpoint, tmp_path):
    check_model_files(backend="torch", checkpoint=shipped_checkpoint)
    with pytest.raises(ModelOptionsError, match="model.safetensors missing"):
        check_model_files(backend="torch", checkpoint=tmp_path)
    with pytest.raises(ModelOptionsError, match="no such ONNX file"):
        check_model_files(backend="onnx", onnx=tmp_path / "m.onnx")


def test_the_environment_variable_picks_the_model(shipped_checkpoint, monkeypatch):
    monkeypatch.setenv(CHECKPOINT_ENV, str(shipped_checkpoint))
    predictor = load_predictor(device="cpu")
    info = model_info(predictor)
    assert info["name"] == shipped_checkpoint.name and len(info["sha256"]) == 12
    assert (info["backend"], info["precision"]) == ("onnx", "int8")  # a CPU's default: the checkpoint's int8 model


def test_model_spec_loads_through_the_library(shipped_checkpoint):
    """Batch workers and Ray replicas load with :class:`ModelSpec`: no CLI involved."""
    from emostream.worker import ModelSpec

    predict, device, info = ModelSpec(checkpoint=str(shipped_checkpoint), device="cpu").load()
    assert device == "cpu (onnxruntime)" and info["name"] == shipped_checkpoint.name and info["precision"] == "int8"
    predict, device, info = ModelSpec(checkpoint=str(shipped_checkpoint), device="cpu", backend="torch").load()
    assert device == "cpu" and info["backend"] == "torch"
    with pytest.raises(ModelOptionsError):
        ModelSpec(backend="onnx").load()
