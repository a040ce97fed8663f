import pytest
import torch

from retrieval.precision import inference_precision


def test_bf16_autocasts_matmuls_and_fp32_does_not():
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with inference_precision("fp32"):
        assert (a @ b).dtype == torch.float32
    with inference_precision("bf16"):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32  # restored on exit


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="fp16"):
        with inference_precision("fp16"):
            pass
