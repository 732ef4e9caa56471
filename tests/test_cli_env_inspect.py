"""`cspine-submit env` and `cspine-submit inspect` through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

from cspine_submit import cli

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
