"""The cuda bias_act launcher's arguments reach the extension's functions by the names and types they take.

No GPU runs the suite, so the launcher (genkernels.cuda.bias_act) never calls the compiled functions here;
a renamed or added argument would surface only on a GPU. Each binding is called with the launcher's own
keyword arguments and a problem the extension refuses before touching a device (n = 0, or a null pointer):
the refusal's message shows the arguments were parsed. Skips when the extension is not built.
"""

from __future__ import annotations

import pytest
import torch

from genkernels.cuda import bias_act as cba


@pytest.fixture(scope="module")
def ext():
    try:
        import genkernels._C as ext
    except ImportError as e:
        pytest.skip(f"the CUDA extension is not built: {e}")
    return ext


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_launcher_arguments_reach_the_bindings(ext, bias_dtype):
    x = torch.zeros(2, 3, 4, dtype=torch.bfloat16)
    bias = torch.zeros(3, dtype=bias_dtype)
    problem = cba._problem(x, bias, "lrelu", 0.2, 1.4, None, 1)
    assert problem["bias_dtype"] == {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[bias_dtype]
    empty = {**problem, "n": 0}
    common = {"dtype": 2, "device": 0}
    with pytest.raises(ValueError, match="n must be > 0"):
        ext.bias_act_forward(16, 16, 16, stream=0, **common, **empty)
    with pytest.raises(ValueError, match="n must be > 0"):
        ext.bias_act_grad(16, 16, 16, 16, out_dtype=2, stream=0, **common, **empty)
    with pytest.raises(ValueError, match="n must be > 0"):
        ext.bias_act_grad_bias_plan(16, 16, 16, **common, **empty)
    with pytest.raises(ValueError, match="dy, bias and partials must be non-null"):
        ext.bias_act_grad_bias(0, 16, 16, 16, 16, 1, stream=0, **common, **problem)
    with pytest.raises(ValueError, match="dbias is not aligned to its dtype"):  # the finishing kernel's output
        ext.bias_act_grad_bias(16, 16, 16, 16, 16, 1, stream=0, dbias=17, **common, **problem)


def test_gradient_codes_reach_the_bindings(ext):
    """The codes argument is parsed by all three launches (the extension refuses codes for an activation
    without them, and an odd codes address, before touching a device); the codes size is 2 * ceil(n / 8)."""
    x = torch.zeros(2, 3, 4, dtype=torch.bfloat16)
    bias = torch.zeros(3)
    common = {"dtype": 2, "device": 0}
    tanh = cba._problem(x, bias, "tanh", 0.2, 1.0, None, 1)
    with pytest.raises(ValueError, match="codes are for linear, relu and lrelu"):
        ext.bias_act_forward(16, 16, 16, stream=0, codes=16, **common, **tanh)
    with pytest.raises(ValueError, match="codes are for linear, relu and lrelu"):
        ext.bias_act_grad(16, 0, 16, 16, out_dtype=2, stream=0, codes=16, **common, **tanh)
    with pytest.raises(ValueError, match="codes are for linear, relu and lrelu"):
        ext.bias_act_grad_bias(16, 0, 16, 16, 16, 1, stream=0, codes=16, **common, **tanh)
    lrelu = cba._problem(x, bias, "lrelu", 0.2, 1.4, None, 1)
    with pytest.raises(ValueError, match="codes must be 2-byte aligned"):
        ext.bias_act_grad(16, 0, 16, 16, out_dtype=2, stream=0, codes=17, **common, **lrelu)
    with pytest.raises(ValueError, match="need x and y 16-byte aligned"):
        ext.bias_act_forward(24, 16, 16, stream=0, codes=16, **common, **lrelu)
    assert [ext.bias_act_codes_bytes(n) for n in (0, 1, 8, 9, 24)] == [0, 2, 2, 4, 6]


def test_forward_codes_declines_before_launching(monkeypatch):
    """forward_codes returns None, without touching the extension, for an activation without codes, a tensor
    below CODES_MIN_NUMEL (a host-bound call) or a misaligned x: the op then keeps x for the backward."""

    def no_extension():
        raise AssertionError("the extension was called")

    monkeypatch.setattr(cba, "require_extension", no_extension)
    big = torch.zeros(cba.CODES_MIN_NUMEL + 8)
    assert cba.forward_codes(big, None, "tanh", 0.2, 1.0, None, 0) is None
    assert cba.forward_codes(big[: cba.CODES_MIN_NUMEL - 1], None, "lrelu", 0.2, 1.0, None, 0) is None
    assert cba.forward_codes(big[1:], None, "lrelu", 0.2, 1.0, None, 0) is None  # 4 bytes past a 16-byte boundary
    with pytest.raises(AssertionError, match="extension was called"):
        cba.forward_codes(big[8:], None, "lrelu", 0.2, 1.0, None, 0)
