"""`cspine-submit env` and `cspine-submit inspect` through the real CLI entry point."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from cspine_submit import cli, quiet
from cspine_submit.files import repo_root

SERIES = Path(__file__).parent / "data" / "dicom" / "series_j2k_ct"
J2K = "1.2.840.10008.1.2.4.90"


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_env_json_reports_versions_and_decoders(capsys):
    code, out, _ = run_cli(capsys, "env", "--json", "--no-tensorflow")
    info = json.loads(out)
    assert code == 0 and info["ok"] and info["missing_required"] == []
    assert info["libraries"]["pydicom"]["version"].startswith("3.")
    assert info["libraries"]["GDCM"]["package"] == "python-gdcm" and info["libraries"]["GDCM"]["version"]
    rows = {r["uid"]: r for r in info["decoders"]}
    for uid in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.57",
                "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", J2K, "1.2.840.10008.1.2.5"):
        assert uid in rows
    assert rows["1.2.840.10008.1.2.4.70"]["available"][:1] == ["gdcm"]
    assert info["tensorflow"] is None


def test_env_text_table(capsys):
    code, out, _ = run_cli(capsys, "env", "--no-tensorflow")
    assert code == 0
    line = next(l for l in out.splitlines() if l.strip().startswith("1.2.840.10008.1.2.4.70"))
    assert "gdcm, pylibjpeg" in line
    assert "pydicom" in out and "not checked" in out


def test_env_fails_listing_packages_when_jpeg_lossless_cannot_be_decoded(capsys, monkeypatch):
    import cspine_submit.read.dicom as dicom

    real = dicom.decoder_table

    def without_jpeg(*args, **kwargs):
        rows = real(*args, **kwargs)
        for row in rows:
            if row["uid"] == "1.2.840.10008.1.2.4.70":
                row.update(available=[], ok=False,
                           missing={"gdcm": "pip install python-gdcm", "pylibjpeg": "pip install pylibjpeg-libjpeg"})
        return rows

    monkeypatch.setattr(dicom, "decoder_table", without_jpeg)
    code, out, _ = run_cli(capsys, "env", "--no-tensorflow")
    assert code == 1
    assert "install one of: gdcm: pip install python-gdcm; pylibjpeg: pip install pylibjpeg-libjpeg" in out


def test_inspect_json_has_exactly_the_agreed_keys(capsys):
    code, out, _ = run_cli(capsys, "inspect", str(SERIES), "--json")
    doc = json.loads(out)
    assert code == 0
    assert list(doc) == ["study_uid", "n_slices", "files", "z", "spacing", "shape", "transfer_syntaxes",
                         "reversed", "skipped", "hu"]
    assert doc["n_slices"] == 20 and len(doc["files"]) == 20 and doc["shape"] == [20, 512, 512]
    assert doc["files"][0].endswith("16573") and doc["files"][-1].endswith("16592")
    assert doc["z"] == [766.5 + 2.0 * i for i in range(20)]
    assert doc["spacing"] == [2.0, 0.9765625, 0.9765625]
    assert doc["transfer_syntaxes"] == {J2K: 20} and doc["reversed"] is False
    assert doc["skipped"] == [{"file": "LICENSE_TotalSegmentator_Apache2.txt", "reason": "not a DICOM file"}]
    assert doc["hu"]["min"] == -1024.0 and 1000 < doc["hu"]["max"] < 3000 and -1000 < doc["hu"]["mean"] < -300


def test_inspect_no_pixels_and_text(capsys):
    code, out, _ = run_cli(capsys, "inspect", str(SERIES), "--json", "--no-pixels")
    assert code == 0 and json.loads(out)["hu"] is None
    code, out, _ = run_cli(capsys, "inspect", str(SERIES), "--no-pixels")
    assert code == 0
    assert "dz 2.000 mm" in out and "SliceThickness says 3.0" in out and "skipped    1" in out


def test_inspect_bad_folder_names_it(capsys, tmp_path):
    missing = tmp_path / "no_study"
    code, out, err = run_cli(capsys, "inspect", str(missing))
    assert code == 1 and out == ""
    assert err.startswith(f"error: {missing}: no such study folder")


def test_env_reports_a_library_that_is_there_but_cannot_be_imported(tmp_path, monkeypatch):
    # e.g. a conda GDCM without pip metadata whose shared library is missing: env must say so, not crash.
    from cspine_submit.commands import env

    (tmp_path / "broken_decoder_mod.py").write_text("raise ImportError('libgdcmMSFF.so: cannot open')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    version = env._version("no-such-distribution-here", "broken_decoder_mod")
    assert version.startswith("installed but cannot be imported (ImportError: libgdcmMSFF.so")
    assert env._version("no-such-distribution-here", "no_such_module_here") is None


def test_env_and_check_show_the_same_decoder_routes(capsys, tmp_path):
    from cspine_submit.read.dicom import decoder_table
    from cspine_submit.tools import bundle, reproduce

    _, env_out, _ = run_cli(capsys, "env", "--no-tensorflow")
    (tmp_path / "model_config.json").write_text("{}")
    bundle.write_manifest(tmp_path)
    _, check_out, _ = run_cli(capsys, "check", "--weights", str(tmp_path), "--no-golden")
    rows = decoder_table()
    assert any(row["direct"] for row in rows)  # the direct routes are there to be shown
    for row in rows:
        route = reproduce.decoder_route(row)
        env_line = next(l for l in env_out.splitlines() if l.strip().startswith(row["uid"] + " "))
        check_line = next(l for l in check_out.splitlines() if f"({row['uid']})" in l)
        assert route in env_line and route in check_line, (env_line, check_line)
        if row["direct"]:
            assert f"direct {row['direct'][0]}; " in check_line


def _start_up_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(re.search(p, line) for p in quiet.START_UP_PATTERNS)]


def test_env_hides_tensorflow_start_up_unless_verbose():
    """In a fresh interpreter (TensorFlow not yet imported): no absl/oneDNN/cuInit line without --verbose; with it,
    TensorFlow's own lines come through (so the patterns do match what it prints here)."""
    def env(*extra):
        proc = subprocess.run([sys.executable, "-m", "cspine_submit", "env", *extra], capture_output=True,
                              text=True, cwd=repo_root(), timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    quiet_out = env()
    assert "tensorflow" in quiet_out and _start_up_lines(quiet_out) == []
    assert _start_up_lines(env("--verbose"))
