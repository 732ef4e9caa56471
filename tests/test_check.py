"""`cspine-submit check`: a tampered weight file fails naming it; golden comparison; golden reproduction."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

from cspine_submit import quiet
from cspine_submit.cli import main
from cspine_submit.files import default_weights_dir, repo_root
from cspine_submit.tools import bundle, reproduce


def test_tampered_weight_file_fails_check(tmp_path, capsys):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "C1.keras").write_bytes(b"weights" * 100)
    (weights / "model_config.json").write_text("{}")
    bundle.write_manifest(weights)
    assert main(["check", "--weights", str(weights), "--no-golden"]) == 0
    assert "check: OK" in capsys.readouterr().out
    data = bytearray((weights / "C1.keras").read_bytes())
    data[10] ^= 0xFF  # flip one byte, same size
    (weights / "C1.keras").write_bytes(bytes(data))
    assert main(["check", "--weights", str(weights), "--no-golden"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS" in out and "C1.keras" in out and "sha256" in out and "check: FAILED" in out


def test_missing_manifest_fails(tmp_path, capsys):
    assert main(["check", "--weights", str(tmp_path), "--no-golden"]) == 1
    assert "no manifest" in capsys.readouterr().out


def test_environment_table_lists_the_libraries():
    names = [k for k, _ in reproduce.environment_table()]
    for lib in ("python", "numpy", "pydicom", "tensorflow", "python-gdcm", "pylibjpeg-libjpeg"):
        assert lib in names


def test_compare_golden_names_each_difference():
    golden = {"s1": {"C1": 0.5, "C2": 0.25}, "s2": {"C1": 0.1}}
    assert reproduce.compare_golden({"s1": {"C1": 0.500001, "C2": 0.25}, "s2": {"C1": 0.1}}, golden) == []
    problems = reproduce.compare_golden({"s1": {"C1": 0.5, "C2": 0.2501}, "s3": {"C1": 0.1}}, golden)
    assert any("s1 C2" in p and "0.2501" in p for p in problems)
    assert any("s2" in p and "not reproduced" in p for p in problems)
    assert any("s3" in p and "not in the golden" in p for p in problems)


GOLDEN = default_weights_dir() / "demo" / reproduce.GOLDEN_NAME


def test_golden_reproduces_and_a_changed_value_is_named(tmp_path, capsys, monkeypatch):
    """The committed demo weights reproduce the committed golden output; a golden value nudged by 2e-5 fails."""
    assert GOLDEN.is_file(), f"{GOLDEN} missing: run `cspine-submit check --write-golden`"
    monkeypatch.setenv("CSPINE_SUBMIT_CACHE", str(tmp_path / "cache"))
    demo_weights = GOLDEN.parent
    # A fresh interpreter, as a user runs it: OK, and none of TensorFlow's start-up lines without --verbose.
    proc = subprocess.run([sys.executable, "-m", "cspine_submit", "check", "--weights", str(demo_weights)],
                          capture_output=True, text=True, cwd=repo_root(), timeout=600)
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0 and f"golden {GOLDEN}: OK" in proc.stdout and "check: OK" in proc.stdout, printed
    assert "7/7 vertebrae with classifiers" in proc.stdout and "warning" not in proc.stdout
    noise = [line for line in printed.splitlines() if any(re.search(p, line) for p in quiet.START_UP_PATTERNS)]
    assert noise == []
    stored = json.loads(GOLDEN.read_text())
    assert len(stored["studies"]) >= 3 and all(len(v) == 8 for v in stored["studies"].values())
    copy = tmp_path / "w"
    shutil.copytree(demo_weights, copy)
    uid = sorted(stored["studies"])[0]
    stored["studies"][uid]["C3"] += 2e-5
    (copy / reproduce.GOLDEN_NAME).write_text(json.dumps(stored))
    bundle.write_manifest(copy)
    assert main(["check", "--weights", str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"study {uid} C3" in out and "check: FAILED" in out


def test_demo_runs_twice_and_writes_the_same_bytes(tmp_path, capsys, monkeypatch):
    """`python make_submission.py` with no arguments (no Kaggle data here) = the demo; twice in a row works
    (it owns its output in the cache folder) and gives a byte-identical submission.csv."""
    monkeypatch.setenv("CSPINE_SUBMIT_CACHE", str(tmp_path / "cache"))
    outputs = []
    for _ in range(2):
        assert main(["submit", "--workers", "0", "--no-progress"]) == 0
        printed = capsys.readouterr().out
        assert "BUILT-IN DEMO" in printed and "DEMO score" in printed
        (sub,) = (tmp_path / "cache" / "demo").glob("*/submission.csv")
        outputs.append(sub.read_bytes())
    assert outputs[0] == outputs[1]
    rows = outputs[0].decode().splitlines()
    assert len(rows) == 1 + 8 * 4 and all(0 < float(r.split(",")[1]) < 1 for r in rows[1:])


def _untrained_folder(folder):
    folder.mkdir()
    shutil.copy(default_weights_dir() / "model_config.json", folder / "model_config.json")
    bundle.write_manifest(folder)
    return folder


def test_check_warns_about_a_folder_without_classifiers(tmp_path, capsys):
    weights = _untrained_folder(tmp_path / "w")
    assert main(["check", "--weights", str(weights), "--no-golden"]) == 0
    out = capsys.readouterr().out
    assert "0/7 vertebrae with classifiers" in out
    assert "warning:" in out and "holds no classifiers" in out and "prior probabilities" in out and "weights/demo" in out


def test_a_folder_without_golden_output_is_not_a_difference(tmp_path, capsys):
    # A trained folder has no golden.json (only the demo carries one): check verifies its manifest and says so.
    weights = _untrained_folder(tmp_path / "w")
    assert main(["check", "--weights", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "golden None" not in out and "DIFFERS" not in out and "check: OK" in out
    assert "nothing to reproduce" in out
