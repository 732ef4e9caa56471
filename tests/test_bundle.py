"""kernel-metadata.json validation (Kaggle CLI rules + ours), the weights manifest, the bundle layout, and (slow)
an offline install of the bundle into a fresh venv running the demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cspine_submit.tools import bundle
from cspine_submit.files import repo_root

REPO = repo_root()


def test_repo_kernel_metadata_is_valid():
    meta = json.loads((REPO / "kernel-metadata.json").read_text())
    v = bundle.validate_kernel_metadata(REPO / "kernel-metadata.json", dataset_id=meta["dataset_sources"][0])
    assert v.ok, v.errors
    assert meta["code_file"] == "make_submission.py" and meta["kernel_type"] == "script"
    assert meta["enable_gpu"] is True and meta["enable_internet"] is False
    assert bundle.COMPETITION in meta["competition_sources"]
    # A template: the owner is a placeholder the bundle replaces, and validation says so.
    assert meta["id"].split("/")[0] == bundle.PLACEHOLDER_OWNER
    assert any("placeholder" in w for w in v.warnings)


GOOD = json.loads((REPO / "kernel-metadata.json").read_text())


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"enable_internet": True}, "enable_internet: must be false"),
        ({"enable_internet": None}, "enable_internet"),
        ({"enable_gpu": "false"}, "enable_gpu: must be true"),
        ({"competition_sources": []}, "competition_sources: must include"),
        ({"id": "noslash"}, "'owner/slug'"),
        ({"id": "me/abc"}, "at least 5 characters"),
        ({"title": "abc"}, "at least five characters"),
        ({"code_file": "missing.py"}, "not found"),
        ({"code_file": ""}, "a source file must be specified"),
        ({"language": "julia"}, "language 'julia'"),
        ({"kernel_type": "notebook"}, "needs an .ipynb"),
        ({"kernel_type": "app"}, "kernel_type 'app'"),
        ({"dataset_sources": ["justaname"]}, "dataset_sources entry"),
        ({"dataset_sources": []}, "dataset_sources: empty"),
        ({"is_private": "yes"}, "is_private"),
    ],
)
def test_kernel_metadata_faults_are_explained(tmp_path, change, expected):
    meta = dict(GOOD, **change)
    meta = {k: v for k, v in meta.items() if v is not None}
    (tmp_path / "make_submission.py").write_text("print(1)\n")
    (tmp_path / "kernel-metadata.json").write_text(json.dumps(meta))
    v = bundle.validate_kernel_metadata(tmp_path / "kernel-metadata.json")
    assert not v.ok
    assert any(expected in e for e in v.errors), v.errors


def test_kernel_metadata_missing_our_dataset(tmp_path):
    shutil.copy(REPO / "kernel-metadata.json", tmp_path)
    (tmp_path / "make_submission.py").write_text("")
    v = bundle.validate_kernel_metadata(tmp_path / "kernel-metadata.json", dataset_id="me/other-dataset")
    assert any("me/other-dataset" in e for e in v.errors)


def test_title_slug_mismatch_is_a_warning(tmp_path):
    (tmp_path / "make_submission.py").write_text("")
    (tmp_path / "kernel-metadata.json").write_text(json.dumps(dict(GOOD, title="Something Else")))
    v = bundle.validate_kernel_metadata(tmp_path / "kernel-metadata.json")
    assert v.ok and any("something-else" in w for w in v.warnings)


def test_bundle_check_only_cli(capsys):
    from cspine_submit.cli import main

    assert main(["bundle", "--check-only"]) == 0
    assert "valid" in capsys.readouterr().out


def test_dataset_metadata_rules():
    ok = {"title": "cspine-submit package", "id": "me/cspine-submit-package", "licenses": [{"name": "other"}]}
    assert bundle.validate_dataset_metadata(ok).ok
    assert not bundle.validate_dataset_metadata(dict(ok, licenses=[{"name": "MIT"}])).ok  # not in Kaggle's list
    assert not bundle.validate_dataset_metadata(dict(ok, title="abc")).ok
    assert not bundle.validate_dataset_metadata(dict(ok, id="me/Bad Slug")).ok


def test_manifest_write_and_verify(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_text("{}")
    (tmp_path / ".hidden").write_text("ignored")
    bundle.write_manifest(tmp_path)
    data = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert sorted(data["files"]) == ["a.bin", "sub/b.json"]
    # sha256 of b"\x00\x01\x02", computed independently
    assert data["files"]["a.bin"] == {
        "sha256": "ae4b3280e56e2faf83f414a6e3dabe9d5fbe18976544c05fed121accb85b53fc", "size": 3}
    assert bundle.verify_manifest(tmp_path) == []
    (tmp_path / "a.bin").write_bytes(b"\x00\x01\x03")  # same size, different content
    problems = bundle.verify_manifest(tmp_path)
    assert len(problems) == 1 and "a.bin" in problems[0] and "sha256" in problems[0]
    (tmp_path / "sub" / "b.json").unlink()
    assert any("b.json" in p and "missing" in p for p in bundle.verify_manifest(tmp_path))
    (tmp_path / "new.txt").write_text("x")
    assert any("new.txt" in p for p in bundle.verify_manifest(tmp_path, extra_ok=False))


def _plant_training_artefacts(weights: Path) -> list[str]:
    """What a user might leave in a weights folder: the old default cache, checkpoints, state, logs, and a work
    folder under another name marked with a CACHEDIR.TAG (as `train --work-dir` marks its own)."""
    from cspine_submit.manifest import tag_cache_dir

    (weights / "cache" / "abc123" / "1.2.3").mkdir(parents=True)
    np.save(weights / "cache" / "abc123" / "1.2.3" / "C1.npy", np.zeros((2, 4, 4), np.int16))
    (weights / "checkpoints").mkdir()
    (weights / "checkpoints" / "C1.last.keras").write_bytes(b"x" * 10)
    (weights / "train_state.json").write_text("{}")
    (weights / "history.csv").write_text("vertebra,epoch\n")
    tag_cache_dir(weights / "my_run_scratch")
    (weights / "my_run_scratch" / "crops.npz").write_bytes(b"y" * 10)
    return ["cache/abc123/1.2.3/C1.npy", "checkpoints/C1.last.keras", "history.csv", "my_run_scratch/CACHEDIR.TAG",
            "my_run_scratch/crops.npz", "train_state.json"]


def test_manifest_and_check_leave_training_artefacts_out(tmp_path, capsys):
    from cspine_submit.cli import main

    (tmp_path / "model_config.json").write_text("{}")
    (tmp_path / "C1.keras").write_bytes(b"model")
    planted = _plant_training_artefacts(tmp_path)
    assert sorted(bundle.training_artefacts(tmp_path)) == sorted(planted)
    assert main(["check", "--weights", str(tmp_path), "--write-manifest"]) == 0
    out = capsys.readouterr().out
    assert "left out 6 training artefact(s)" in out and "checkpoints/C1.last.keras" in out
    data = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert sorted(data["files"]) == ["C1.keras", "model_config.json"]
    assert bundle.verify_manifest(tmp_path, extra_ok=False) == []  # the artefacts are not "unlisted files"


def test_committed_weights_manifest_matches():
    assert (REPO / "weights" / "MANIFEST.json").is_file()
    assert bundle.verify_manifest(REPO / "weights", extra_ok=False) == []


def _repo_copy(dest: Path) -> Path:
    """The files build_bundle reads, copied, with a fresh weights manifest (independent of work in progress)."""
    dest.mkdir()
    shutil.copytree(REPO / "cspine_submit", dest / "cspine_submit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "weights", dest / "weights")
    for name in ("make_submission.py", "kernel-metadata.json", "setup.cfg", "pyproject.toml"):
        shutil.copy2(REPO / name, dest / name)
    bundle.write_manifest(dest / "weights")
    return dest


def test_bundle_refuses_weights_without_classifiers_and_needs_an_owner(tmp_path, monkeypatch):
    repo = _repo_copy(tmp_path / "repo")
    # The repository's weights/ is the untrained starting config: a kernel with it would only write priors.
    with pytest.raises(ValueError, match="no classifiers.*--allow-untrained"):
        bundle.build_bundle(tmp_path / "ds", wheels=False, owner="someone", repo=repo)
    assert not (tmp_path / "ds").exists()
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    with pytest.raises(ValueError, match="--owner"):
        bundle.build_bundle(tmp_path / "ds", weights=repo / "weights" / "demo", wheels=False, repo=repo)
    with pytest.raises(ValueError, match="not a Kaggle user name"):
        bundle.build_bundle(tmp_path / "ds", weights=repo / "weights" / "demo", wheels=False, repo=repo,
                            owner=bundle.PLACEHOLDER_OWNER)
    with pytest.raises(FileNotFoundError, match="no-such"):
        bundle.build_bundle(tmp_path / "ds", weights=tmp_path / "no-such", wheels=False, owner="someone", repo=repo)
    monkeypatch.setenv("KAGGLE_USERNAME", "from-env")
    result = bundle.build_bundle(tmp_path / "ds", wheels=False, allow_untrained=True, repo=repo)
    assert result.dataset_id == "from-env/cspine-submit-package"
    assert result.weights.n_vertebrae == 0 and any("untrained" in n for n in result.notes)
    assert (tmp_path / "ds" / "weights" / "demo" / "model_config.json").is_file()


def test_bundle_ships_the_demo_weights_and_the_notebook(tmp_path):
    out = tmp_path / "ds"
    repo = _repo_copy(tmp_path / "repo")
    demo = repo / "weights" / "demo"
    result = bundle.build_bundle(out, weights=demo, wheels=False, owner="someone", repo=repo)
    for rel in ("cspine_submit/__init__.py", "cspine_submit/cli.py", "make_submission.py", "weights/MANIFEST.json",
                "dataset-metadata.json", "kernel-metadata.json", "setup.cfg", bundle.NOTEBOOK_FILE):
        assert (out / rel).is_file(), rel
    assert not list(out.rglob("__pycache__"))
    # weights/ of the bundle is the demo folder: its config, its five fold models, its manifest.
    assert json.loads((out / "weights" / "model_config.json").read_text())["trained_on"] == "synthetic"
    assert sorted(p.name for p in (out / "weights").glob("*.keras")) == [f"all.f{k}.keras" for k in range(5)]
    assert bundle.verify_manifest(out / "weights", extra_ok=False) == []
    assert result.weights.n_vertebrae == 7 and result.weights.classifier_files == 5
    assert any("SYNTHETIC" in n for n in result.notes)
    assert result.sizes["total"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert result.sizes["weights"] > result.weights.classifier_bytes > 0
    # Ids for the owner, no placeholder; the licence a name Kaggle accepts, the description saying MIT.
    meta = json.loads((out / "dataset-metadata.json").read_text())
    assert meta["id"] == "someone/cspine-submit-package" == result.dataset_id
    assert bundle.validate_dataset_metadata(meta).ok and "MIT" in meta["description"]
    kernel = json.loads((out / "kernel-metadata.json").read_text())
    assert kernel["id"] == "someone/cspine-submit-rsna-2022" == result.kernel_id
    assert kernel["dataset_sources"] == ["someone/cspine-submit-package"]
    assert kernel["code_file"] == bundle.NOTEBOOK_FILE and kernel["kernel_type"] == "notebook"
    assert bundle.PLACEHOLDER_OWNER not in (out / "kernel-metadata.json").read_text()
    assert result.kernel.ok and not result.kernel.warnings
    with pytest.raises(FileExistsError):
        bundle.build_bundle(out, weights=demo, wheels=False, owner="someone", repo=repo)
    # Training artefacts left in the weights folder are neither copied nor a reason to refuse; the result names them.
    planted = _plant_training_artefacts(demo)
    result = bundle.build_bundle(tmp_path / "ds3", weights=demo, wheels=False, owner="someone", repo=repo)
    assert set(planted) <= set(result.left_out)
    assert not any((tmp_path / "ds3" / "weights" / rel).exists() for rel in planted)
    # A weight file changed after the manifest was written: the bundle refuses, naming it.
    (demo / "slice_ranges.json").write_text("{}")
    with pytest.raises(ValueError, match="slice_ranges.json"):
        bundle.build_bundle(tmp_path / "ds2", weights=demo, wheels=False, owner="someone", repo=repo)


def test_notebook_template_is_a_notebook_that_runs_make_submission():
    nb = json.loads((REPO / "cspine_submit" / "data" / bundle.NOTEBOOK_TEMPLATE).read_text())
    assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["language"] == "python"
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    compile(code, bundle.NOTEBOOK_TEMPLATE, "exec")
    assert all(c.get("outputs", []) == [] for c in nb["cells"])  # shipped clean
    assert "make_submission.py" in code and "/kaggle/working" in code and "/kaggle/input" in code


def test_wheel_note_names_the_platform_cap(monkeypatch):
    monkeypatch.setattr(bundle, "installed_platform_tags", lambda _pkg: ["manylinux_2_34_x86_64",
                                                                         "manylinux_2_31_x86_64"])
    why = bundle._why_no_pinned_wheel("pylibjpeg-libjpeg", "pylibjpeg-libjpeg==2.5.0", "3.11",
                                      bundle.DEFAULT_PLATFORMS)
    assert "manylinux_2_31_x86_64" in why and "cap manylinux_2_28_x86_64" in why and "--platform" in why
    monkeypatch.setattr(bundle, "installed_platform_tags", lambda _pkg: ["manylinux_2_17_x86_64"])
    why = bundle._why_no_pinned_wheel("x", "x==1.0", "3.12", bundle.DEFAULT_PLATFORMS)
    assert "for Python 3.12" in why


def run_notebook_cells(notebook: Path, dataset: Path, root: Path, python: str, env: dict | None = None):
    """Run the notebook's code cells, in order, as one program of ``python``: ``/kaggle/input`` is ``root/input``
    (holding the dataset folder, as Kaggle mounts it) and ``/kaggle/working`` is ``root/working``."""
    (root / "input").mkdir(parents=True)
    (root / "input" / "cspine-submit-package").symlink_to(dataset.resolve(), target_is_directory=True)
    nb = json.loads(notebook.read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    code = code.replace("/kaggle/input", str(root / "input")).replace("/kaggle/working", str(root / "working"))
    return subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=900)


DECODER_ENTRIES = ("pydicom", "pylibjpeg", "libjpeg", "_libjpeg", "openjpeg", "_openjpeg", "gdcm", "_gdcm",
                   "python_gdcm", "dicomsdl")


def _environment_without_decoders(dest: Path) -> Path:
    """A folder of symlinks to the test environment's site-packages minus the DICOM decoders and this package
    (so that TensorFlow, numpy, pandas, cv2 ... come from the environment and the decoders cannot)."""
    import numpy

    src = Path(numpy.__file__).parent.parent
    dest.mkdir()
    for entry in src.iterdir():
        name = entry.name.lower()
        if name.startswith(DECODER_ENTRIES) or entry.suffix == ".pth" or "cspine" in name:
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


@pytest.mark.slow
def test_bundle_installs_offline_and_runs_the_demo(tmp_path):
    """Build the bundle with wheels; in a fresh venv where the decoders are NOT importable, make_submission.py
    (run from the bundle folder) installs them from the bundle's wheels alone (--no-index) and runs the demo."""
    out = tmp_path / "ds"
    result = bundle.build_bundle(out, weights=REPO / "weights" / "demo", owner="someone", wheels=True)
    names = sorted(w.name.split("-")[0].lower() for w in result.wheels)
    assert names == ["dicomsdl", "pydicom", "pylibjpeg", "pylibjpeg_libjpeg", "python_gdcm"], (names, result.wheel_errors)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    py = str(venv / "bin" / "python")
    site = Path(subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # Appended AFTER the venv's own site-packages: what pip installs into the venv wins.
    (site / "zz_environment.pth").write_text(str(_environment_without_decoders(tmp_path / "envlinks")) + "\n")
    # No index at all: pip may only use the wheels it is pointed at.
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", CSPINE_SUBMIT_CACHE=str(tmp_path / "cache"))
    for key in ("PYTHONPATH", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL"):
        env.pop(key, None)
    missing = subprocess.run([py, "-c", "import pydicom"], capture_output=True, env=env, cwd=tmp_path)
    assert missing.returncode != 0  # the decoders really are absent before make_submission.py runs
    # The kernel's notebook, cell by cell (off Kaggle, make_submission.py runs the demo with the bundle's weights).
    proc = run_notebook_cells(out / bundle.NOTEBOOK_FILE, out, tmp_path / "kaggle", py, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "installing decoder wheels offline" in proc.stdout
    assert "BUILT-IN DEMO" in proc.stdout and "DEMO score" in proc.stdout
    assert "make_submission.py exit code: 0" in proc.stdout
    rows = (tmp_path / "kaggle" / "working" / "submission.csv").read_text().splitlines()
    assert rows[0] == "row_id,fractured" and len(rows) == 1 + 8 * 4
    where = subprocess.check_output(
        [py, "-c", "import pydicom, libjpeg, gdcm; print(pydicom.__file__, libjpeg.__file__, gdcm.__file__)"],
        text=True, env=env, cwd=tmp_path)
    assert all(p.startswith(str(site)) for p in where.split()), where


def test_bundle_cli_upload_instructions_keep_the_subfolders(tmp_path, capsys):
    # `kaggle datasets create -p DIR` skips sub-folders by default (--dir-mode skip): the dataset would lack the
    # package, weights/ and wheels/, and make_submission.py could not find cspine_submit on Kaggle.
    from cspine_submit.cli import main

    demo = str(REPO / "weights" / "demo")
    assert main(["bundle", "--out", str(tmp_path / "ds"), "--no-wheels", "--owner", "someone", "--weights", demo]) == 0
    out = capsys.readouterr().out
    assert "7/7 vertebrae with classifiers" in out and "'synthetic'" in out and "upload" in out
    assert "kaggle kernels push -p" in out
    create = [line for line in out.splitlines() if "kaggle datasets create" in line]
    assert create and all("--dir-mode zip" in line for line in create), out
    assert (tmp_path / "ds" / "cspine_submit" / "__init__.py").is_file()
    # Without classifiers: refused, exit 2, naming the way out.
    assert main(["bundle", "--out", str(tmp_path / "ds2"), "--no-wheels", "--owner", "someone"]) == 2
    out = capsys.readouterr().out
    assert "no classifiers" in out and "--weights weights/demo" in out and not (tmp_path / "ds2").exists()
