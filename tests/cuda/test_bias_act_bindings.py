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
