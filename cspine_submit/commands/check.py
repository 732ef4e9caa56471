"""Check that this installation reproduces the committed results.

Prints the environment table (interpreter, library versions, which decoder serves each transfer syntax),
verifies MANIFEST.json of the weights folder (sha256 and size of every file), and reproduces the stored golden
output (the demo studies' 8 probabilities each, within 1e-5). Exits non-zero naming every difference.
--write-manifest and --write-golden (re)write those files after a deliberate change of the weights.
"""

from __future__ import annotations

from pathlib import Path

from cspine_submit import manifest, quiet
from cspine_submit.files import default_weights_dir
from cspine_submit.tools import reproduce

NAME = "check"
HELP = "environment table, weights MANIFEST.json verification and golden-output reproduction"
ORDER = 80


def add_arguments(parser) -> None:
    parser.add_argument("--weights", type=Path, help="weights folder to verify (default: weights/ beside the "
                        "package; its golden output is weights/demo's)")
    parser.add_argument("--no-golden", action="store_true", help="skip the golden reproduction (the slow part: it "
                        "generates and scores the demo studies)")
    parser.add_argument("--write-manifest", action="store_true", help="write MANIFEST.json for --weights and exit")
    parser.add_argument("--write-golden", action="store_true",
                        help="recompute golden.json with the demo weights (weights/demo) and exit")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's start-up messages (CUDA probing)")


def run(args) -> int:
    weights = args.weights or default_weights_dir()
    golden_run = not (args.no_golden or args.write_manifest) and reproduce.golden_location(weights) is not None
    if args.write_golden or golden_run:
        try:  # the golden run needs TensorFlow: start it now, with its start-up messages hidden unless --verbose
            quiet.start_tensorflow(args.verbose)
        except ImportError:
            pass  # the golden reproduction reports it
    if args.write_golden:
        target = weights if (weights / "model_config.json").is_file() and args.weights else weights / "demo"
        print(f"wrote {reproduce.write_golden(target)}")
        return 0
    if args.write_manifest:
        path = manifest.write_manifest(weights, created_by="cspine-submit check --write-manifest")
        left_out = manifest.training_artefacts(weights)
        print(f"wrote {path}")
        if left_out:
            print(f"left out {len(left_out)} training artefact(s) (cache, checkpoints, train state, logs; not "
                  f"needed for inference): {', '.join(left_out[:5])}{' ...' if len(left_out) > 5 else ''}")
        return 0
    result = reproduce.run_check(weights, golden=not args.no_golden)
    for title, rows in (("environment", result.environment), ("decoders", result.decoders)):
        width = max((len(k) for k, _ in rows), default=0)
        print(f"{title}:")
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
    print(f"manifest {result.manifest}: {'OK' if not result.manifest_problems else 'DIFFERS'}")
    for p in result.manifest_problems:
        print(f"  DIFFERS: {p}")
    if result.weights is not None:
        print(f"weights {weights}: {result.weights.describe()}")
    if not args.no_golden and result.golden is not None:
        print(f"golden {result.golden}: {'OK' if not result.golden_problems else 'DIFFERS'}")
    for p in result.golden_problems:
        print(f"  DIFFERS: {p}")
    for note in result.notes:
        print(f"warning: {note}")
    print("check: OK" if result.ok else "check: FAILED")
    return 0 if result.ok else 1
