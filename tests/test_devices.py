"""--device, $MULTIDIFF_DEVICE and --dtype: what is picked, and errors that name where the value came from,
the value and the choices, on one line."""
from __future__ import annotations

import pytest
import torch

from multidiff_cli.errors import UsageError
from multidiff_cli.models.device import pick_device, pick_dtype

CPU = torch.device("cpu")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("name, source, message", [
    ("gpu", "--device", "--device: 'gpu' is not a device; choose cpu, cuda, cuda:N or mps"),
    ("meta", "--device", "--device: 'meta' is not a device; choose cpu, cuda, cuda:N or mps"),
    ("cuda", "$MULTIDIFF_DEVICE", "$MULTIDIFF_DEVICE: 'cuda' asked for CUDA, but torch sees no CUDA device here; "
                                  "choose cpu (or leave it unset for the best present)"),
    ("cuda:1", "--device", "--device: 'cuda:1' asked for CUDA, but torch sees no CUDA device here; "
                           "choose cpu (or leave it unset for the best present)"),
    ("mps", "$MULTIDIFF_DEVICE", "$MULTIDIFF_DEVICE: 'mps' asked for Apple MPS, but it is not available here; "
                                 "choose cpu (or leave it unset for the best present)"),
])
def test_a_device_error_names_its_source_and_the_choices_on_one_line(no_gpu, name, source, message):
    with pytest.raises(UsageError) as caught:
        pick_device(name, source=source)
    assert str(caught.value) == message
    assert caught.value.exit_code == 2


def test_a_missing_cuda_index_names_the_devices_there_are(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UsageError) as caught:
        pick_device("cuda:2")
    assert str(caught.value) == ("--device: 'cuda:2' asked for CUDA device 2, but torch sees 2 (cuda:0 to cuda:1); "
                                 "choose cpu or cuda:0 to cuda:1 (or leave it unset for the best present)")
    assert pick_device("cuda:1") == torch.device("cuda:1")


def test_devices_that_are_present_are_picked(no_gpu):
    assert pick_device("cpu", source="$MULTIDIFF_DEVICE") == CPU
    assert pick_device(None) == CPU
    assert pick_device("") == CPU


@pytest.mark.parametrize("source", ["--dtype", "$MULTIDIFF_DTYPE"])
def test_a_dtype_error_names_its_source_and_the_choices(source):
    with pytest.raises(UsageError) as caught:
        pick_dtype(CPU, "fp16", source=source)
    assert str(caught.value) == f"{source}: 'fp16' is not a dtype; choose float32, float16 or bfloat16"
    assert caught.value.exit_code == 2
    assert pick_dtype(CPU, "bfloat16", source=source) == torch.bfloat16


def test_device_errors_name_where_the_value_came_from(cli, sofa_scene, monkeypatch):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("MULTIDIFF_DEVICE", "cuda")
    from_env = cli.render(sofa_scene)
    assert from_env.exit_code == 2
    assert from_env.stderr.startswith("error: $MULTIDIFF_DEVICE: 'cuda' asked for CUDA") and "--device" not in from_env.stderr
    given = cli.render(sofa_scene, "--device", "gpu")
    assert given.exit_code == 2 and given.stderr.strip() == (
        "error: --device: 'gpu' is not a device; choose cpu, cuda, cuda:N or mps")
