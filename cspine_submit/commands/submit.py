"""Turn a folder of test studies into submission.csv (also ``python make_submission.py``).

Defaults: on Kaggle (the competition's input folder exists) the competition's test_images/ and test.csv, writing
/kaggle/working/submission.csv with an 8.5 h time budget. Elsewhere, without --test-dir, the built-in demo: a few
synthetic test studies generated into a cache folder, scored with weights/demo, and scored against their truth.

Every study listed gets its rows: a study that is missing or cannot be read gets the priors, and the run report
(JSON next to the submission) says why. --resume skips the studies already journaled by a killed run.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

from cspine_submit import quiet

NAME = "submit"
HELP = "predict a test folder and write submission.csv (no arguments: Kaggle paths, else the built-in demo)"
ORDER = 10

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_COMPETITION = KAGGLE_INPUT / "rsna-2022-cervical-spine-fracture-detection"
KAGGLE_OUT = Path("/kaggle/working/submission.csv")
KAGGLE_BUDGET_S = 8.5 * 3600


def parse_duration(text: str) -> float:
    """``"8.5h"``, ``"90m"``, ``"300s"`` or a plain number of hours -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([hms]?)\s*", str(text))
    if not m:
        raise ValueError(f"--time-budget {text!r}: expected e.g. 8.5h, 90m, 300s (a plain number means hours)")
    value, unit = float(m.group(1)), m.group(2) or "h"
    return value * {"h": 3600.0, "m": 60.0, "s": 1.0}[unit]


def default_workers() -> int:
    """One worker per logical CPU, at most 4 (Kaggle: 4). The main process mostly waits for the GPU; even scoring on
    the CPU (2 CPUs, tiny demo classifiers) a run's marginal cost per study was 1.1-4.8x lower with 2 workers than
    with 1 in every paired measurement of ``cspine-submit bench --workers 1,2`` (issue 13's note)."""
    import os

    return max(1, min(4, os.cpu_count() or 2))


def add_arguments(parser) -> None:
    parser.add_argument("--test-dir", type=Path, help="folder with one sub-folder per study (default: Kaggle's "
                        "test_images, else the demo)")
    parser.add_argument("--test-csv", type=Path, help="test.csv (default: test.csv beside --test-dir, if any)")
    parser.add_argument("--weights", type=Path, help="weights folder (default: weights/, or weights/demo for the demo)")
    parser.add_argument("--out", type=Path, help="submission CSV (default: /kaggle/working/submission.csv on Kaggle, "
                        "./submission.csv elsewhere, the demo's cache folder for the demo)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="worker processes reading studies (0: in-process; default: one per CPU, at most 4)")
    parser.add_argument("--batch-size", type=int, help="crops per forward pass (default: model_config.json)")
    parser.add_argument("--time-budget", help="e.g. 8.5h, 90m, 300s (default: 8.5h on Kaggle, none elsewhere)")
    parser.add_argument("--study-timeout", type=float, default=600.0,
                        help="seconds one study may take, in a worker (reading) and again in scoring, before it gets "
                        "the priors (default 600; guards against a decoder or a GPU call that hangs; 0: no limit)")
    parser.add_argument("--refresh-every", type=float, default=30.0, metavar="SECONDS",
                        help="rewrite the complete submission.csv (atomically) at most this often as studies finish "
                        "(default 30; 0: after every study); it holds the priors for the studies not done yet")
    parser.add_argument("--allow-priors", action="store_true",
                        help="exit 0 even when the run cannot be right (no classifier loaded, JPEG Lossless not "
                        "decodable, more than half of the studies fell back to the priors); default: exit 3")
    parser.add_argument("--backend", choices=("auto", "tensorflow", "torch", "jax"), default="auto",
                        help="Keras backend that scores the classifiers (default auto: TensorFlow when it sees a GPU, "
                        "else torch or jax if one does, else TensorFlow on the CPU); the log and the report say which")
    parser.add_argument("--require-gpu", action="store_true",
                        help="stop (exit 3) when TensorFlow sees no GPU instead of scoring on the CPU")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's start-up messages (CUDA probing)")
    parser.add_argument("--resume", action="store_true", help="skip studies already in the journal beside --out")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.add_argument("--report", type=Path, help="run report JSON (default: <out stem>.report.json beside --out)")
    parser.add_argument("--demo", action="store_true", help="run the built-in demo even on Kaggle")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--previews", type=int, default=0, metavar="N",
                        help="after the run, write crop previews of the N studies whose profile alignment looked "
                        "worst beside the report (<out stem>.preview_<uid>.png), planned with the run's own slice "
                        "ranges and config (default 0: none)")


EXIT_OK, EXIT_EXISTS, EXIT_USAGE, EXIT_WRONG = 0, 1, 2, 3
"""Exit codes: done; --out exists; bad arguments or files; the run cannot be right (the complete file is written
first; ``--allow-priors`` turns this into 0)."""


SHOWN_FALLBACKS = 10
"""Fallback studies named one per line in the summary; the report lists them all."""


def _loud(message: str) -> None:
    bar = "!" * 100
    print(f"{bar}\nWARNING: {message}\n{bar}", flush=True)


def _resolve(args):
    """Decide test folder, test.csv, weights, output and budget; returns a dict and whether this is the demo."""
    from cspine_submit.files import default_weights_dir

    on_kaggle = KAGGLE_INPUT.exists()
    budget = parse_duration(args.time_budget) if args.time_budget else (KAGGLE_BUDGET_S if on_kaggle else None)
    if args.test_dir is None and not args.demo and (KAGGLE_COMPETITION / "test_images").is_dir():
        return dict(test_dir=KAGGLE_COMPETITION / "test_images",
                    test_csv=args.test_csv or KAGGLE_COMPETITION / "test.csv",
                    weights=args.weights or default_weights_dir(),
                    out=args.out or KAGGLE_OUT, budget=budget, demo=None, own_output=False)
    if args.test_dir is None:
        from cspine_submit.tools import demo

        print("No --test-dir and no Kaggle competition data: running the BUILT-IN DEMO on synthetic studies.")
        data = demo.prepare_demo(weights=args.weights)
        out = args.out or data.root / "submission.csv"
        return dict(test_dir=data.test_dir, test_csv=data.test_csv, weights=data.weights, out=out, budget=budget,
                    demo=data, own_output=args.out is None)
    test_csv = args.test_csv
    if test_csv is None and (args.test_dir.parent / "test.csv").is_file():
        test_csv = args.test_dir.parent / "test.csv"
    return dict(test_dir=args.test_dir, test_csv=test_csv, weights=args.weights or default_weights_dir(),
                out=args.out or Path("submission.csv"), budget=budget, demo=None, own_output=False)


def _print_summary(result, demo_data) -> None:
    t = result.totals
    print(f"wrote {result.out} ({t['rows']} rows, {t['studies']} studies: {t['ok']} ok, {t['fallback']} fallback"
          f"{', ' + str(t['resumed']) + ' resumed' if t['resumed'] else ''})")
    reasons = list(t["fallback_reasons"].items())
    for uid, reason in reasons[:SHOWN_FALLBACKS]:
        print(f"  fallback {uid}: {reason}")
    if len(reasons) > SHOWN_FALLBACKS:
        print(f"  ... and {len(reasons) - SHOWN_FALLBACKS} more fallbacks (totals.fallback_reasons in the report)")
    if t.get("studies_with_bad_files"):
        bad = t["studies_with_bad_files"]
        print(f"  bad files in {len(bad)} {'study' if len(bad) == 1 else 'studies'} that went on without them: "
              f"{t['files_skipped']} file(s) left out, {t['slices_replaced']} undecodable slice(s) replaced by a "
              f"neighbour (e.g. {bad[0]}; each study's warnings in the report name them)")
    rate = t["studies_per_s"]
    print(f"wall {t['wall_seconds']:.2f} s (+ {t['load_seconds']:.2f} s loading classifiers, ranges and test.csv), "
          f"{'n/a' if rate is None else f'{rate:.3f}'} studies/s, slices read {t['slices_read']}")
    if t["seconds_by_stage"]:
        print("seconds by stage (summed over studies; worker stages overlap the main process): " + ", ".join(
            f"{k} {v:.2f}" for k, v in t["seconds_by_stage"].items()))
    for event in t["time_budget"]["events"]:
        print(f"time budget: after study {event['after_study']}: {event['action']}")
    print(f"run report: {result.report_path}")
    if demo_data is not None:
        from cspine_submit.train import metric

        ev = metric.evaluate_files(result.out, demo_data.labels)
        print(f"DEMO score against the synthetic truth ({demo_data.labels}): {ev.score:.4f} "
              f"(weighted log loss, lower is better; constant 0.5 scores 0.693)")


def _print_implausible(totals: dict, folders) -> None:
    """Say how many studies' profile cue matched the learned neck far worse than normal studies do, and how to look."""
    uids = totals.get("implausible_alignment_studies") or []
    if not uids:
        return
    print(f"WARNING: {len(uids)} of {totals['studies']} studies had an implausible profile alignment (the cue slices "
          "match the learned neck far worse than any training study did): their planned vertebra ranges may be far "
          "off; they were scored anyway. Each one's report entry says why (plan.alignment).")
    print(f"  look at one: cspine-submit preview {folders.get(uids[0], uids[0])} --out preview_{uids[0]}.png, or "
          "rerun with --previews N to draw the worst N with this run's slice ranges")
    if len(uids) > 1:
        print(f"  the others: {', '.join(uids[1:6])}{' ...' if len(uids) > 6 else ''} (totals.implausible_alignment_studies)")


def _write_previews(setup, result, n: int) -> None:
    """--previews N: the worst-aligned studies' crop previews beside the report (never fails the run)."""
    from cspine_submit.submit.previews import write_previews

    written, problems = write_previews(setup, result.studies, result.report_path, n)
    for path in written:
        print(f"preview: {path}")
    for problem in problems:
        print(f"note: {problem}")


def _first_study(plan) -> Path | None:
    return next((Path(plan.folders[u]) for u in plan.studies if Path(plan.folders[u]).is_dir()), None)


class _Stop(Exception):
    """A step ends the command: exit ``code``, after printing ``message`` (if any)."""

    def __init__(self, code: int, message: str | None = None):
        super().__init__(message)
        self.code, self.message = code, message


def run(args) -> int:
    """The command's steps in order; each may stop it with its exit code (:class:`_Stop`). Ctrl-C and SIGTERM end
    it cleanly at any step: one line, the report when the studies had started, exit 128 + the signal's number."""
    previous = _route_sigterm()
    out = None
    try:
        where, out = resolve_paths(args)
        plan = plan_and_write_priors(args, where, out)
        problems, decoders = check_decoders_first(args, plan, out)
        backend = choose_keras_backend(args)
        if backend.name == "tensorflow":
            quiet.start_tensorflow(args.verbose)
        setup = set_up_run(args, where, plan)
        announce(args, where, setup, decoders, out)
        result = stream(args, where, setup, out)
        return verdict(args, result, problems, out)
    except _Stop as stop:
        if stop.message:
            print(stop.message, flush=True)
        return stop.code
    except KeyboardInterrupt as exc:  # before the studies started (stream_studies handles its own)
        signum = int(getattr(exc, "signum", signal.SIGINT))
        where_now = (f"{out} holds the priors for every row" if out is not None and out.exists()
                     else "nothing was written")
        print(f"\ninterrupted before the studies started ({signal.Signals(signum).name}): {where_now}; rerun the "
              "command", flush=True)
        return 128 + signum
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def choose_keras_backend(args):
    """Step 4: the Keras backend that scores (``--backend``), chosen before Keras loads (it reads KERAS_BACKEND
    then). ``auto`` imports TensorFlow to ask whether it sees a GPU: quietly unless ``--verbose``, as
    :func:`cspine_submit.quiet.start_tensorflow` (its CUDA probing writes to the native stderr before any log level
    applies)."""
    from cspine_submit.score.backends import choose_backend

    quiet.quiet_tensorflow(args.verbose)
    try:
        with quiet.native_stderr_hidden(not args.verbose):
            backend = choose_backend(args.backend)
    except (ValueError, RuntimeError) as exc:
        raise _Stop(EXIT_USAGE, f"error: {exc}") from None
    print(backend.line(), flush=True)
    return backend


def _route_sigterm():
    """SIGTERM (``kill``, a notebook's stop, a container's shutdown) raises
    :class:`cspine_submit.submit.run.Interrupted`, so that it ends the run as Ctrl-C does; returns the handler it
    replaced (None when this is not the main thread, where no handler can be set)."""
    def handler(signum, frame):
        from cspine_submit.submit.run import Interrupted

        raise Interrupted(signum)

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def resolve_paths(args) -> tuple[dict, Path]:
    """Step 1: the test folder, test.csv, weights, output and budget (:func:`_resolve`), checked
    (:func:`cspine_submit.submit.inputs.check_inputs`: exit 2 naming the path); an existing --out stops (exit 1)."""
    from cspine_submit.submit.inputs import check_inputs

    try:
        where = _resolve(args)
        # Before anything is written or loaded: a mistyped path exits 2 in a second, with no CSV.
        check_inputs(where["test_dir"], where["test_csv"], where["weights"], test_csv_given=args.test_csv is not None)
    except ValueError as exc:
        raise _Stop(EXIT_USAGE, f"error: {exc}") from None
    out = Path(where["out"])
    if out.exists() and not (args.force or args.resume or where["own_output"]):
        raise _Stop(EXIT_EXISTS, f"error: {out} exists; use --force to overwrite it or --resume to continue the run "
                    "that wrote it")
    return where, out


def plan_and_write_priors(args, where: dict, out: Path):
    """Step 2: the rows, and a complete file of priors from the first seconds (a killed run's file is kept when
    resuming: it holds finished studies). Reads only JSON and CSV: no TensorFlow yet."""
    # The stage is imported here, not at the top: the CLI imports every command module to build its parser.
    from cspine_submit.submit import initial_priors, submission

    try:
        plan = submission.plan_rows(where["test_dir"], where["test_csv"])
        priors = initial_priors(where["weights"])
    except (FileNotFoundError, ValueError) as exc:
        raise _Stop(EXIT_USAGE, f"error: {exc}") from None
    if not (args.resume and out.exists()):
        submission.write_submission(out, plan.row_ids, {r: priors[submission.split_row_id(r)[1]] for r in plan.row_ids})
    return plan


def check_decoders_first(args, plan, out: Path):
    """Step 3: the decoder self-test on the first study; without a JPEG Lossless decoder the run stops (exit 3)
    unless --allow-priors. Returns the problems to repeat at the end and the decoder check."""
    from cspine_submit.read import preflight

    decoders = preflight.check_decoders(_first_study(plan))
    for problem in decoders.problems:
        _loud(problem)
    if decoders.problems and not args.allow_priors:
        raise _Stop(EXIT_WRONG, f"error: stopping before the run: the studies could not be read (the complete priors "
                    f"file {out} is written; --allow-priors runs anyway)")
    return list(decoders.problems), decoders


def set_up_run(args, where: dict, plan):
    """Step 4 (TensorFlow is loaded): classifiers, config and ranges (:func:`cspine_submit.submit.prepare_run`)."""
    from cspine_submit.submit import prepare_run

    try:
        return prepare_run(where["test_dir"], where["test_csv"], where["weights"], demo=where["demo"] is not None,
                           batch_size=args.batch_size, weights_error="priors", plan=plan)
    except (FileNotFoundError, ValueError) as exc:
        raise _Stop(EXIT_USAGE, f"error: {exc}") from None


def announce(args, where: dict, setup, decoders, out: Path) -> None:
    """Step 5: say what will run where; stop (exit 3) without a GPU under --require-gpu, or without any classifier
    unless --allow-priors."""
    devices = setup.devices
    print(f"test folder: {where['test_dir']}\ntest.csv: {where['test_csv']}\nweights: {setup.weights_dir} "
          f"(trained_on={setup.config.trained_on}, head={setup.config.head}, "
          f"{len(setup.models)}/7 classifiers)\nslice ranges: {setup.ranges_path}\n"
          f"studies: {len(setup.plan.studies)}, rows: {len(setup.plan.row_ids)}, out: {out}\n"
          f"classifiers run on: {devices.summary()}")
    for note in decoders.notes:
        print(f"decoders: {note}")
    if where["budget"]:
        print(f"time budget: {where['budget'] / 3600:.2f} h ({where['budget']:.0f} s)")
    for note in setup.notes:
        print(f"note: {note}")
    if devices.kind != "GPU" and (KAGGLE_INPUT.exists() or args.require_gpu):
        _loud(f"NO GPU: the classifiers would run on the CPU in {devices.precision} "
              f"({'; '.join(devices.why)}); the time budget would lower the slices per vertebra")
        if args.require_gpu:
            raise _Stop(EXIT_WRONG, "error: --require-gpu and TensorFlow sees no GPU")
    for warning in setup.warnings:
        _loud(warning)
    if not setup.models and not args.allow_priors:
        _stop_without_classifiers(args, where, setup, out)


def _stop_without_classifiers(args, where: dict, setup, out: Path) -> None:
    """No classifier loaded: the complete priors file and a report that says so for every study, then exit 3."""
    from cspine_submit.submit.inputs import WEIGHTS_FIX
    from cspine_submit.submit.run import priors_only_run

    reason = f"not run: no classifier could be loaded from {setup.weights_dir}"
    result = priors_only_run(setup, out, reason, resume=args.resume, report_path=args.report)
    _print_summary(result, None)
    raise _Stop(EXIT_WRONG, f"error: no classifier could be loaded from {setup.weights_dir}; {out} holds the priors "
                f"for every row and {result.report_path} says so. To score: {WEIGHTS_FIX}. (--allow-priors runs "
                "anyway and exits 0.)")


def stream(args, where: dict, setup, out: Path):
    """Step 6: the run itself (:func:`cspine_submit.submit.run_submission`), then its summary; an interrupted run
    stops here with its one line (exit 128 + the signal's number)."""
    from cspine_submit.submit import run_submission

    timeout = args.study_timeout if args.study_timeout > 0 else None
    result = run_submission(setup, out, workers=args.workers, time_budget=where["budget"], resume=args.resume,
                            report_path=args.report, progress=not args.no_progress, study_timeout=timeout,
                            refresh_seconds=args.refresh_every)
    stopped = result.totals.get("interrupted")
    if stopped:
        print(f"\ninterrupted: {stopped['done']} of {stopped['of']} studies done; the submission holds their scores "
              f"and priors for the rest; rerun with --resume (run report: {result.report_path})", flush=True)
        raise _Stop(stopped["exit_code"])
    for warning in result.totals["warnings"][len(setup.warnings):]:  # raised during the run (e.g. the warm-up)
        _loud(warning)
    _print_summary(result, where["demo"])
    _print_implausible(result.totals, setup.plan.folders)
    if args.previews > 0:
        _write_previews(setup, result, args.previews)
    return result


def verdict(args, result, problems: list[str], out: Path) -> int:
    """Step 7: exit 0, or 3 when the run cannot be right (repeating why) unless --allow-priors."""
    from cspine_submit.submit import run_problems

    problems = problems + run_problems(result.totals)
    for problem in problems:
        _loud(f"THIS RUN CANNOT BE RIGHT: {problem}")
    if problems and not args.allow_priors:
        print(f"exit {EXIT_WRONG}: {out} is complete but not to be trusted (--allow-priors accepts such a run)")
        return EXIT_WRONG
    return EXIT_OK
