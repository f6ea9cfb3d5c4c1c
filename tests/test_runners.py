"""inference/runners: which ONNX Runtime execution providers a --device asks for."""

from __future__ import annotations

import os

import pytest
import torch

from covidseg.errors import UsageError
from covidseg.inference.runners import requested_providers


def test_provider_requests():
    assert requested_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(UsageError, match="--device"):
        requested_providers("gpu7")
    if not os.path.exists("/dev/nvidiactl") and not torch.cuda.is_available():
        assert requested_providers("auto") == ["CPUExecutionProvider"]
