"""One module per ``cspine-submit`` subcommand.

Each module defines ``NAME`` (the subcommand), ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Modules must import heavy libraries (TensorFlow, nibabel, cv2) inside ``run`` so
that ``cspine-submit --help`` and ``cspine-submit env`` start fast. ``cli.py`` discovers the modules.
"""
