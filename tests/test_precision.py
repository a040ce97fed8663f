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


def test_auto_uses_bf16_only_with_native_instructions():
    from retrieval.precision import cpu_has_native_bf16, resolve_precision

    avx2_only = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    sapphire_rapids = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    assert not cpu_has_native_bf16(avx2_only)
    assert cpu_has_native_bf16(sapphire_rapids)
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    expected = "bf16" if (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) or (
        not torch.cuda.is_available() and cpu_has_native_bf16()) else "fp32"
    assert resolve_precision("auto") == expected
