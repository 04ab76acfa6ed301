"""The built CUDA extension's machine code (SASS), read with cuobjdump: properties of a kernel's schedule
that decide its speed and that no CPU test of its results can see.

A thread issues its instructions in order, and one that reads a register a load writes waits until the
load's data has arrived. So a row kernel that decodes each vector right after loading it waits for one
memory round trip a vector; one that issues every load of the row before using any waits for one.
:func:`loads_used_before_the_last_load` finds the first pattern in straight-line SASS (program order,
every branch taken as falling through, which is how the row kernels' per-vector conditional blocks run
for a full row).

Skips when the extension is not built or no cuobjdump is found (triton ships one).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_REGISTER = re.compile(r"\bR(\d+)\b")
_PREDICATE = re.compile(r"^@!?U?P\w+\s+")


def _extension() -> Path:
    try:
        import genkernels._C as ext
    except ImportError as e:
        pytest.skip(f"the CUDA extension is not built: {e}")
    return Path(ext.__file__)


def _cuobjdump() -> str:
    env = os.environ.get("TRITON_CUOBJDUMP_PATH")
    if env and os.access(env, os.X_OK):
        return env
    try:
        import triton

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    found = shutil.which("cuobjdump")
    if found is None:
        pytest.skip("no cuobjdump (triton's or on PATH): cannot read the extension's SASS")
    return found


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def kernel_names(pattern: str) -> list[str]:
    """Mangled names of the extension's kernels whose name matches ``pattern`` (a regex)."""
    symbols = _run(_cuobjdump(), "-symbols", str(_extension()))
    names = {line.split()[-1] for line in symbols.splitlines() if "STT_FUNC" in line and "STO_ENTRY" in line}
    return sorted(n for n in names if re.search(pattern, n))


def sass(*names: str) -> dict[str, list[list[str]]]:
    """The instructions of each kernel in ``names`` (one cuobjdump call, about a third of a second a kernel),
    one list per compiled architecture (predicates kept)."""
    text = _run(_cuobjdump(), "-sass", "-fun", ",".join(names), str(_extension()))
    bodies: dict[str, list[list[str]]] = {}
    for body in re.split(r"\n\s*Function : ", text)[1:]:
        name = body.split(maxsplit=1)[0]
        bodies.setdefault(name, []).append([m.group(1) for m in _INSTRUCTION.finditer(body)])
    return bodies


def first_path(instructions: list[str]) -> list[str]:
    """The instructions before the kernel's first store: in a flat elementwise pass (flat_walk), the
    full-block path's loads and arithmetic, which the compiler lays out first (a test states how many loads
    it expects there, so a different layout fails instead of passing unchecked)."""
    stores = [i for i, ins in enumerate(instructions) if _PREDICATE.sub("", ins).startswith("ST")]
    return instructions[: stores[0]] if stores else instructions


def between_stores(instructions: list[str]) -> list[list[str]]:
    """The instructions split at the stores (which are left out): segment i ends at store i."""
    segments: list[list[str]] = [[]]
    for ins in instructions:
        if _PREDICATE.sub("", ins).startswith("ST"):
            segments.append([])
        else:
            segments[-1].append(ins)
    return segments


def _load_registers(operands: str, opcode: str) -> set[int]:
    first = _REGISTER.match(operands.strip())
    if first is None:
        return set()
    width = 4 if ".128" in opcode else 2 if ".64" in opcode else 1
    return set(range(int(first.group(1)), int(first.group(1)) + width))


def loads_used_before_the_last_load(instructions: list[str], load: str) -> list[str]:
    """The instructions, in program order up to the last load whose opcode starts with ``load``, that read a
    register an earlier such load wrote: each one makes the loads after it wait for a round trip."""
    loads = [i for i, ins in enumerate(instructions) if _PREDICATE.sub("", ins).startswith(load)]
    if not loads:
        return []
    pending: set[int] = set()
    early = []
    for ins in instructions[: loads[-1]]:
        opcode, _, operands = _PREDICATE.sub("", ins).partition(" ")
        if opcode.startswith(load):
            pending |= _load_registers(operands, opcode)
            continue
        if opcode.startswith("ST"):
            sources = operands
        else:
            sources = operands.partition(",")[2]
        read = {int(r) for r in _REGISTER.findall(sources)}
        if read & pending:
            early.append(ins)
            pending -= read
    return early


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "residual+norm"])
def test_adaln_forward_issues_every_row_load_first(dtype, residual):
    """layer_norm_modulate's forward (and the fused residual + norm's) on 16-byte vectors, compiled for K = 2, 3
    and 4 vectors a thread: every streaming load of the row (x, and the residual's y) goes out before any of
    their data is used, so a row waits for one DRAM round trip, not one a vector (3 a thread at DiT-XL's
    D = 1152, 4 at FLUX's 3072; 8 with y)."""
    names = kernel_names(rf"adaln_forward_kernelINS_\d*{dtype}ELi8ELb{int(residual)}ELi[234]E")
    assert len(names) == 3, names
    for name, per_arch in sass(*names).items():
        k = int(re.search(r"ELi([234])EE", name)[1])
        for instructions in per_arch:
            streaming = [i for i in instructions if _PREDICATE.sub("", i).startswith("LDG.E.EF")]
            loads = k * (2 if residual else 1) * (2 if dtype == "F32" else 1)  # 16-byte loads a thread
            assert len(streaming) == loads, (name, streaming)
            assert loads_used_before_the_last_load(instructions, "LDG.E.EF") == [], name


#: The elementwise passes whose first path (the instructions before the first store) is checked, by kernel-name
#: pattern (the 16-byte-vector instantiations of every dtype), with the streaming loads a step issues there.
#: chunk_walk.cuh's flat_walk passes take 4 vectors a thread a step: 4 loads per tensor read. bias_act: its
#: benchmark's activation, lrelu (act code 2), with and without the gradient codes (2 bits an element: one 2-
#: or 1-byte load a vector in place of x's); the gradient with dbias walks a tile's rows 4 at a time. The
#: sampler step: one vector a step of its grid-stride loop, 5 loads (x, the guided model output's two halves,
#: noise, x0_prev; absent ones predicated off). Reparameterization and the coupling layer, one vector a step
#: of a chunk walk: mean, logvar and a noise tensor's eps forward, dz, mean, logvar and eps backward; x and
#: h's two channels forward, dy, h and x backward.
ELEMENTWISE_PASSES = {
    "gelu_tanh forward": (r"gelu_tanh_forward_kernelINS_\w+?ELi[48]E", 4),
    "gelu_tanh gradient": (r"gelu_tanh_grad_kernelINS_\w+?ELi[48]E", 8),
    "swiglu forward": (r"swiglu_forward_kernelINS_\w+?ELi[48]E", 8),
    "swiglu gradient": (r"swiglu_grad_kernelINS_\w+?ELi[48]E", 12),
    "bias_act lrelu forward": (r"bias_act_forward_kernelILi2E\w+?ELi[48]E", 4),
    "bias_act lrelu gradient": (r"bias_act_grad_kernelILi2E\w+?ELi[48]E", 8),
    "bias_act lrelu gradient with dbias": (r"bias_act_grad_bias_kernelILi2E\w+?ELi[48]E", 8),
    "sampler step": (r"schedule_step_kernelINS_\w+?ELi[48]E", 5),
    "reparameterize forward": (r"reparam_forward_kernelINS_\w+?ELi[48]E", 3),
    "reparameterize backward": (r"reparam_backward_kernelINS_\w+?ELi[48]E", 4),
    "coupling forward": (r"coupling_forward_kernelINS_\w+?ELi[48]E", 3),
    "coupling backward": (r"coupling_backward_kernelINS_\w+?ELi[48]E", 3),
}


@pytest.mark.parametrize("what", list(ELEMENTWISE_PASSES))
def test_elementwise_passes_issue_a_steps_loads_first(what):
    """Every streaming load of a step goes out before any of its data is used. Without the compiler barrier
    after the step's loads (chunk_walk.cuh's loads_issued), the bf16 gelu_tanh and swiglu kernels decoded
    their first vector, with the reciprocal's slow path in between, before issuing the others: two DRAM
    round trips a step instead of one. The sampler step, reparameterization and the coupling layer decoded
    each input in the conditional block that loaded it: one round trip per input."""
    pattern, loads = ELEMENTWISE_PASSES[what]
    names = kernel_names(pattern)
    assert len(names) >= 3, names  # one a dtype at least
    bodies = sass(*names)
    assert sorted(bodies) == names
    for name, per_arch in bodies.items():
        for instructions in per_arch:
            path = first_path(instructions)
            streaming = [i for i in path if _PREDICATE.sub("", i).startswith("LDG.E.EF")]
            assert len(streaming) == loads, (name, streaming)
            assert loads_used_before_the_last_load(path, "LDG.E.EF") == [], name


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_rope_issues_a_units_loads_first(interleaved):
    """rope's rotation unit (the code between the copy unit's store, laid out first, and its own first
    store): x's runs (two rotate-half, one interleaved) and both tables' values (each load under either
    table dtype's predicate) all go out before any is used. Before, each table value was decoded where it
    was loaded: 2 * 8 cache round trips (bf16) before x was even requested."""
    names = kernel_names(rf"rope_kernelILb{int(interleaved)}ENS_\w+?ELi[48]E")
    assert len(names) == 3, names
    for name, per_arch in sass(*names).items():
        for instructions in per_arch:
            unit = between_stores(instructions)[1]
            opcodes = [_PREDICATE.sub("", i) for i in unit]
            assert sum(op.startswith("LDG.E.EF") for op in opcodes) == (1 if interleaved else 2), name
            pairs = (4 if "F32" in name else 8) // (2 if interleaved else 1)
            assert sum(op.startswith("LDG.E.") and "CONSTANT" in op for op in opcodes) >= 2 * pairs, name
            assert loads_used_before_the_last_load(unit, "LDG") == [], name


def test_the_check_finds_a_load_used_before_the_next():
    """The helper on hand-written SASS: a decode between two loads is found, one after them is not."""
    serial = [
        "@P1 LDG.E.EF.128 R24, desc[UR8][R26.64]",
        "SHF.L.U32 R75, R24, 0x10, RZ",
        "@P2 LDG.E.EF.128 R28, desc[UR8][R30.64]",
        "SHF.L.U32 R76, R28, 0x10, RZ",
    ]
    assert loads_used_before_the_last_load(serial, "LDG.E.EF") == ["SHF.L.U32 R75, R24, 0x10, RZ"]
    together = [serial[0], serial[2], serial[1], serial[3]]
    assert loads_used_before_the_last_load(together, "LDG.E.EF") == []
    # the address register of a later load is not a use of an earlier load's data, a store's data is
    stored = ["LDG.E.EF.128 R4, desc[UR8][R2.64]", "STG.E desc[UR8][R8.64], R5", "LDG.E.EF.128 R12, desc[UR8][R10.64]"]
    assert loads_used_before_the_last_load(stored, "LDG.E.EF") == ["STG.E desc[UR8][R8.64], R5"]
