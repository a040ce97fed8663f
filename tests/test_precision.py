import re
from pathlib import Path

import pytest
import torch

from retrieval.precision import cpu_has_native_bf16, inference_precision, resolve_precision


def test_bf16_autocasts_matmuls_and_fp32_does_not():
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with inference_precision("fp32"):
        assert (a @ b).dtype == torch.float32
    with inference_precision("bf16"):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32  # restored on exit


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match=r"^unknown precision 'fp16': use one of auto, fp32, bf16$"):
        with inference_precision("fp16"):
            pass


def test_native_bf16_is_read_from_the_flags_lines():
    avx2_only = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    sapphire_rapids = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    zen4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"  # avx512_bf16 without AMX is native too
    assert not cpu_has_native_bf16(avx2_only)
    assert cpu_has_native_bf16(sapphire_rapids) and cpu_has_native_bf16(zen4)
    # A flag's name elsewhere than on a flags line (here the model name) is not a CPU flag.
    assert not cpu_has_native_bf16("model name\t: amx_bf16 emulator\nflags\t\t: fpu avx2\n")
    assert not cpu_has_native_bf16("")


def test_explicit_precisions_are_kept():
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"


def test_auto_follows_this_machine():
    if torch.cuda.is_available():
        expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    else:
        # Read here independently of cpu_has_native_bf16: a whole-word search of the kernel's flags lines.
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        expected = "bf16" if re.search(r"^flags\s*:.*\b(avx512_bf16|amx_bf16)\b", cpuinfo, re.M) else "fp32"
    assert resolve_precision("auto") == expected
