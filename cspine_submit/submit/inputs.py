"""The submit command's inputs checked before anything is written or loaded: a wrong path fails in a second.

A mistyped ``--test-dir`` used to "succeed" with a header-only CSV, and a mistyped ``--weights`` to exit 3 after
TensorFlow had started, with a priors file (issue 21). Each check here reads only the file system and JSON/CSV,
never TensorFlow, and raises :class:`InputError` naming the path, what is wrong and the fix; the CLI turns it into
exit 2 (bad arguments or files) before any CSV exists.
"""

from __future__ import annotations

from pathlib import Path

from cspine_submit.config import ModelConfig
from cspine_submit.score.loading import NOTEBOOK_FILES
from cspine_submit.submit.submission import read_test_csv, study_folders

WEIGHTS_FIX = ("train classifiers first (`cspine-submit train --data <competition data> --ranges "
               "weights/slice_ranges.json --out DIR`, then --weights DIR), or try the package with the demo's "
               "weights (--weights weights/demo)")
"""What to do about a weights folder with no classifier in it (also said when a run loads none)."""

_STUDY_LAYOUT = "one sub-folder per study, named by its StudyInstanceUID and holding that study's .dcm files"


class InputError(ValueError):
    """A path given to ``submit`` cannot be used; the message names it, says why, and says what to do."""


def check_inputs(test_dir: str | Path, test_csv: str | Path | None, weights_dir: str | Path, *,
                 test_csv_given: bool = False) -> None:
    """Raise :class:`InputError` unless the test folder, test.csv and weights folder can make a submission.

    Parameters
    ----------
    test_dir : path
        Must exist, and hold at least one study folder unless ``test_csv`` lists studies (those without a folder
        are then reported missing and get their priors, as on Kaggle's public test set).
    test_csv : path or None
        Must parse when it exists (:func:`~cspine_submit.submit.submission.read_test_csv`).
    weights_dir : path
        Must exist and hold model_config.json (readable) or the seed notebook's ``spine_C*.h5`` files.
    test_csv_given : bool
        ``test_csv`` was named on the command line: then it must exist too.
    """
    test_dir = Path(test_dir)
    if not test_dir.is_dir():
        what = "is a file, not a folder" if test_dir.exists() else "no such folder"
        raise InputError(f"--test-dir {test_dir}: {what}; give the folder with {_STUDY_LAYOUT} (on Kaggle: "
                         "<competition>/test_images; without --test-dir, the built-in demo runs)")
    _check_study_folders(test_dir, listed=_check_test_csv(test_csv, test_csv_given))
    check_weights(weights_dir)


def _check_test_csv(test_csv, given: bool) -> int:
    """Studies ``test_csv`` lists (0 when there is none)."""
    if test_csv is None:
        return 0
    test_csv = Path(test_csv)
    if not test_csv.is_file():
        if given:
            raise InputError(f"--test-csv {test_csv}: no such file; give the competition's test.csv "
                             "(columns row_id, StudyInstanceUID, prediction_type), or leave --test-csv out to "
                             "predict every study folder")
        return 0
    try:
        rows = read_test_csv(test_csv)
    except ValueError as exc:  # pandas' parser errors are ValueErrors too; read_test_csv names the file
        raise InputError(f"{exc} (fix the file, or leave --test-csv out to predict every study folder)") from None
    return len({uid for _, uid, _ in rows})


def _check_study_folders(test_dir: Path, listed: int) -> None:
    """``test_dir`` (a folder) holds study folders, or test.csv lists ``listed`` > 0 studies to report missing."""
    folders = study_folders(test_dir)
    stage_names = {"test_images", "train_images", "segmentations"} & set(folders)
    if stage_names:
        inner = "test_images" if "test_images" in stage_names else sorted(stage_names)[0]
        raise InputError(f"--test-dir {test_dir}: holds {inner}/, which is not a study: this looks like the "
                         f"competition's data folder; give --test-dir {test_dir / inner}")
    if folders or listed:
        return
    if any(test_dir.glob("*.dcm")):
        raise InputError(f"--test-dir {test_dir}: holds .dcm files but no study sub-folder: it looks like one "
                         f"study's folder; give its parent, the folder with {_STUDY_LAYOUT} ({test_dir.parent})")
    raise InputError(f"--test-dir {test_dir}: holds no study folder (it needs {_STUDY_LAYOUT}); nothing to predict")


def check_weights(weights_dir: str | Path) -> None:
    """Raise :class:`InputError` unless ``weights_dir`` is a weights folder: model_config.json that reads, or the
    seed notebook's files. A folder whose classifier files are missing passes (the run says so and exits 3)."""
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        what = "is a file, not a folder" if weights_dir.exists() else "no such folder"
        raise InputError(f"--weights {weights_dir}: {what}; {WEIGHTS_FIX}")
    config = weights_dir / "model_config.json"
    if config.is_file():
        try:
            ModelConfig.from_json(config)
        except ValueError as exc:  # names the file and the key
            raise InputError(f"{exc} (the weights folder's model_config.json; rewrite it with `train`, or {WEIGHTS_FIX})"
                             ) from None
        return
    if not any((weights_dir / name).is_file() for name in NOTEBOOK_FILES.values()):
        seed = f"{NOTEBOOK_FILES['C1']}..{NOTEBOOK_FILES['C7']}"
        raise InputError(f"--weights {weights_dir}: neither model_config.json nor the seed notebook's {seed} are "
                         f"there, so it is not a weights folder; {WEIGHTS_FIX}")
