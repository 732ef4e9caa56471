"""Shared pytest fixtures: a small synthetic dataset in the competition's layout, generated once per session.

Fixtures
--------
synthetic_dataset : Path
    Root of the dataset: ``train_images/``, ``test_images/``, ``segmentations/``, ``train.csv``,
    ``train_bounding_boxes.csv``, ``test.csv``, ``sample_submission.csv``, ``test_labels.csv``.
    6 training studies (the first 4 with masks), 3 test studies, 128 x 128 px, 3-4 mm slices (tens of slices),
    a mix of JPEG Lossless .4.70 and uncompressed files, 3 studies numbered feet to head, both PixelRepresentations.
    Treat it as read-only (copy a study to ``tmp_path`` before damaging it).
synthetic_info : cspine_submit.datasets.synthetic.SyntheticDataset
    What was written: ``.train`` / ``.test`` records (uid, labels, spec with flags such as ``spec.reversed``,
    ``spec.compressed``, folder, n_slices, spacing, segmented), ``.params``.
synthetic_truth : callable
    ``synthetic_truth(uid) -> SyntheticStudy``: the rendered truth of a study (``hu`` as written, ``labels`` the axial
    label volume z head to feet, ``fracture`` voxels, ``spacing``, ``file_numbers``); cached.
"""

from __future__ import annotations

import functools

import pytest

SYNTH_PARAMS = dict(
    scheme="uniform",  # the generator's first scheme: this set's studies stay what the tests were written against
    n_train=6,
    n_test=3,
    seed=119,
    n_segmented=4,
    size=128,
    spacing=(3.0, 4.0),
    compressed_fraction=0.67,
    reversed_fraction=0.34,
    signed_fraction=0.5,
    no_modality_fraction=0.34,
    # Seed and prevalence chosen so that the set has 2 negative and 4 positive training studies (5 vertebrae
    # fractured, a wedge among them), 1 negative test study, reversed studies with and without masks, and all four
    # (compressed, signed) combinations among the masked studies; tests/test_synthetic.py checks this mix.
    prevalence={"C1": 0.2, "C2": 0.2, "C3": 0.2, "C4": 0.2, "C5": 0.2, "C6": 0.2, "C7": 0.2},
)
"""Parameters of the session dataset (keyword arguments of ``generate_dataset``)."""


@pytest.fixture(scope="session")
def synthetic_info(tmp_path_factory):
    from cspine_submit.datasets.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic") / "rsna-synthetic"
    return generate_dataset(root, **SYNTH_PARAMS)


@pytest.fixture(scope="session")
def synthetic_dataset(synthetic_info):
    return synthetic_info.root


@pytest.fixture(scope="session")
def synthetic_ranges(synthetic_dataset, tmp_path_factory):
    """slice_ranges.json learned from the session dataset's masks and images (learned once for every test file)."""
    from cspine_submit.localize import learn_ranges

    learned, _ = learn_ranges(synthetic_dataset / "segmentations", synthetic_dataset / "train_images")
    path = tmp_path_factory.mktemp("ranges") / "slice_ranges.json"
    learned.to_json(path)
    return path


@pytest.fixture(scope="session")
def synthetic_truth(synthetic_info):
    from cspine_submit.datasets.synthetic import render_study

    @functools.lru_cache(maxsize=None)
    def truth(uid: str):
        return render_study(synthetic_info.record(uid).spec)

    return truth


REAL_NECK_PARAMS = dict(size=128, slice_mm=1.25, seed=0, fov_mm=(160.0, 240.0), head_mm=(5.0, 35.0),
                        chest_mm=(15.0, 60.0), reversed_fraction=0.5)
"""Parameters of the session's real-neck studies (keyword arguments of ``write_studies``): the first cut's ranges
(the real-like default cut is measured in benchmarks/bench_localize_real.py)."""


@pytest.fixture(scope="session")
def real_neck_dataset(tmp_path_factory):
    """The 11 real necks of tests/data/real_neck written as competition-style studies, cut like competition scans.

    Returns ``(root, records)``: ``root/images/<uid>/``, ``root/segmentations/<uid>.nii``, ``root/studies.csv``,
    ``root/studies.json``, ``root/test.csv``; ``records`` as ``write_studies`` returns them (per study ``name``,
    ``uid``, ``cut``, ``reversed``, ``transfer_syntax``, ``z_ranges``, ...). 128 x 128 px, 1.25 mm slices, 6 of 11
    numbered feet to head, 6 JPEG Lossless. Treat it as read-only.
    """
    from pathlib import Path

    from cspine_submit.datasets.volume_study import write_studies

    root = tmp_path_factory.mktemp("real_neck") / "real-necks"
    records = write_studies(Path(__file__).parent / "data" / "real_neck", root, **REAL_NECK_PARAMS)
    return root, records


@pytest.fixture(scope="session")
def real_neck_whole(tmp_path_factory):
    """The same 11 real necks written whole (no cut, native 128 x 128 grid and slices): what the shipped
    ``weights/slice_ranges.json`` is learned from. Returns the dataset root (``images/``, ``segmentations/``)."""
    from pathlib import Path

    from cspine_submit.datasets.volume_study import write_studies

    root = tmp_path_factory.mktemp("real_neck_whole") / "real-necks-whole"
    write_studies(Path(__file__).parent / "data" / "real_neck", root, cut=False, seed=0, progress=False)
    return root
