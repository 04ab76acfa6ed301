"""genkernels bench as a user runs it: command-line edges, exit statuses, and what the reports say."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import uuid

import pytest
import torch

from genkernels.bench import core, main, report, runner, selfcheck

REPO = pathlib.Path(__file__).resolve().parents[2]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without a GPU")


def _fast_self_check(monkeypatch, status: str = "ok") -> None:
    """The self-check of every op and backend answered at once with ``status``."""
    monkeypatch.setattr(selfcheck, "_in_process", lambda op, b: core.SelfCheck(op, b, status, "stubbed"))
    monkeypatch.setattr(selfcheck, "_triton", lambda op, interpret: core.SelfCheck(op, "triton", status, "stubbed"))


@pytest.mark.parametrize("text", [",", "", " , "])
def test_ops_naming_no_op_is_an_error(text, tmp_path, capsys, monkeypatch):
    """`--ops ,` named no op and silently ran all fourteen."""
    _fast_self_check(monkeypatch)
    with pytest.raises(SystemExit) as e:
        main(["--ops", text, "--out", str(tmp_path)])
    assert e.value.code == 2 and "--ops" in capsys.readouterr().err


def test_ops_named_twice_run_once():
    assert runner._parse_ops("rope,rope, group_norm,rope") == ["rope", "group_norm"]


@no_gpu
def test_out_that_cannot_be_created_fails_before_any_work(tmp_path, capsys, monkeypatch):
    """An --out under a file (or anywhere not writable) failed with a traceback after the whole run."""
    _fast_self_check(monkeypatch)
    a_file = tmp_path / "f"
    a_file.write_text("")
    assert main(["--out", str(a_file / "sub"), "--ops", "rope"]) == 2
    captured = capsys.readouterr()
    assert "--out" in captured.err and str(a_file / "sub") in captured.err
    assert "No CUDA GPU" not in captured.out


@no_gpu
@pytest.mark.parametrize("status", ["error", "failed"])
def test_a_self_check_that_did_not_pass_is_named(status, tmp_path, capsys, monkeypatch):
    """A check that could not finish ("error": the triton child died or timed out, the harness raised)
    verified nothing and was not listed at the end, as if every backend had passed; it is now, and the exit
    status stays 1 for wrong numbers only (a slow machine's timeout is not a bug of the backend)."""
    _fast_self_check(monkeypatch, status)
    assert runner.run(tmp_path, ["rope"]) == (1 if status == "failed" else 0)
    out = capsys.readouterr().out
    said = "produced wrong numbers" if status == "failed" else "could not finish"
    assert f"3 backend(s) {said}" in out or f"3 check(s) {said}" in out
    assert "rope/triton" in out and "rope/reference" in out
    checks = json.loads((tmp_path / report.SELFCHECK_JSON).read_text())["checks"]
    assert {c["status"] for c in checks} == {status}


@no_gpu
def test_all_ok_self_check_exits_0(tmp_path, monkeypatch):
    _fast_self_check(monkeypatch, "ok")
    assert runner.run(tmp_path, ["rope", "gan"]) == 0


@no_gpu
def test_gpu_only_options_say_they_are_ignored_without_a_gpu(tmp_path, capsys, monkeypatch):
    """--quick and --budget-s were accepted and silently ignored by the CPU self-check."""
    _fast_self_check(monkeypatch)
    assert main(["--out", str(tmp_path), "--ops", "rope", "--quick", "--budget-s", "5"]) == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--budget-s" in out and "ignored" in out
    assert main(["--out", str(tmp_path), "--ops", "rope"]) == 0
    assert "ignored" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["--redraw", "bench.json", "--ops", "rope"],
        ["--redraw", "bench.json", "--quick"],
        ["--redraw", "bench.json", "--budget-s", "10"],
        ["--redraw", "bench.json", "--self-check", "reference"],
        ["--self-check", "reference", "--out", "/tmp/x"],
        ["--self-check", "reference", "--quick"],
    ],
)
def test_options_the_chosen_mode_would_ignore_are_errors(argv, capsys):
    """--redraw draws a chart and --self-check runs one backend's check: they ignored the other options."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot be combined" in err


def test_redraw_of_a_missing_or_foreign_file_is_a_clear_error(tmp_path, capsys):
    """A missing file, a file that is not JSON and a selfcheck.json each raised a traceback."""
    not_json = tmp_path / "notes.txt"
    not_json.write_text("hello")
    other = tmp_path / report.SELFCHECK_JSON
    other.write_text(json.dumps({"meta": {}, "checks": []}))
    for path in (tmp_path / "missing" / "bench.json", not_json, other):
        assert main(["--redraw", str(path), "--out", str(tmp_path / "png")]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "Traceback" not in err
    assert not (tmp_path / "missing").exists()  # nothing created for a file that is not there
    a_file = tmp_path / "f"
    a_file.write_text("")
    report.write(tmp_path, {"device": "test"}, core.Ceilings(1.0, 1.0), [], [], with_chart=False)
    assert main(["--redraw", str(tmp_path / report.JSON_NAME), "--out", str(a_file)]) == 2
    assert "--out" in capsys.readouterr().err


def _suite_variants() -> list[str]:
    """Every variant of every case of the whole suite that a chart draws as a bar (the base is the axis)."""
    names: list[str] = []
    for op in runner.OPS:
        for case in runner.op_module(op).cases():
            base = case.peer if case.peer is not None else core.EAGER
            names += [n for n in case.variant_names() if n != base and n not in names]
    return names


def test_chart_colors_tell_every_variant_family_apart():
    """In a whole-suite chart the spare colors ran out and 'genkernels' (the model ops' own variant) was drawn
    in torch.compile's gray."""
    families = list(dict.fromkeys(report._family(v) for v in _suite_variants()))
    assert "genkernels" in families and core.COMPILE in families
    colors = report.variant_colors(families)
    assert set(colors) >= set(families)
    drawn = [colors[f] for f in families]
    assert len(set(drawn)) == len(drawn), dict(zip(families, drawn))


@no_gpu
@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_bench_sh_resolves_relative_paths_against_the_callers_folder(tmp_path):
    """scripts/bench.sh changed to the repository root before running, so `--out results` from another folder
    wrote into the checkout. Run with a stand-in virtualenv (this interpreter, the install stamp current, pip
    forbidden): nothing is installed."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / "bin" / "activate").write_text(
        f'export PATH="{pathlib.Path(sys.executable).parent}:$PATH"\n'
        'pip() { echo "bench.sh tried to install" >&2; exit 97; }\n'
    )
    stamp = subprocess.run(
        ["bash", "-c", "cat pyproject.toml setup.py CMakeLists.txt $(find csrc -type f | sort) | sha256sum"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    (venv / ".genkernels-build-inputs").write_text(stamp + "\n")
    caller = tmp_path / "caller"
    caller.mkdir()
    name = f"bench-edges-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET", "GENKERNELS_REBUILD")}
    env["GENKERNELS_VENV"] = str(venv)
    try:
        proc = subprocess.run(
            ["bash", str(REPO / "scripts" / "bench.sh"), "--ops", "rope", "--no-interpret", "--out", name],
            cwd=caller,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode == 97:
            pytest.skip("the build inputs changed while the test ran: bench.sh would have installed")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert (caller / name / report.SELFCHECK_JSON).is_file()
        assert not (REPO / name).exists()
    finally:
        if (REPO / name).is_dir():  # written into the checkout by the defect: clean up
            for p in (REPO / name).iterdir():
                p.unlink()
            (REPO / name).rmdir()


def test_quick_help_says_what_quick_runs():
    """--quick's help said "bf16 cases only (what the goals need)": its cases include float32 ones
    (schedule_step's are all float32), and goals stated on the cases it leaves out show UNMEASURED."""
    quick = [c for op in runner.OPS for c in runner.op_module(op).cases(quick=True)]
    assert any(c.params.get("dtype") == "fp32" for c in quick)
    help_text = " ".join(runner.parser().format_help().split())
    assert "bf16 cases only" not in help_text and "UNMEASURED" in help_text
