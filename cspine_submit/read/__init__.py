"""Reading a study: header walk, pixel routes and decoder plugins, slice ordering, decoding to HU, streaming.

The stage's face: other stages import these names from :mod:`cspine_submit.read` (or a public module of it),
never a private name. Steps in data-flow order: :func:`scan_study` (headers only: :func:`read_slice_header` per
file, then :func:`order_slices`: sorted slices, z, spacing) -> :func:`read_slices` / :func:`decode_into` (only the
planned slices, to HU) -> :func:`iter_studies` (workers that do both for the next studies while the current one is
scored).
"""

from cspine_submit.read.dicom import StudyHeader, decode_into, hu_dtype, read_slices, read_study, scan_study, to_hu
from cspine_submit.read.orientation import affine_to_axial, axial_axcodes, axial_to_competition, mask_to_axial
from cspine_submit.read.plugins import REQUIRED_TRANSFER_SYNTAXES, decoder_table, missing_decoders
from cspine_submit.read.reader import Outcome, iter_studies
from cspine_submit.read.stacks import read_reusing, reusable_stack  # noqa: F401 - a worker's reused study stacks
from cspine_submit.read.slice_header import DicomReadError, SliceInfo, read_slice_header
from cspine_submit.read.slice_order import natural_key, order_slices

__all__ = [
    "REQUIRED_TRANSFER_SYNTAXES", "DicomReadError", "SliceInfo", "StudyHeader", "decode_into", "decoder_table",
    "hu_dtype", "missing_decoders", "natural_key", "order_slices", "read_slice_header", "read_slices", "read_study",
    "scan_study", "to_hu", "affine_to_axial", "axial_axcodes", "axial_to_competition", "mask_to_axial", "Outcome",
    "iter_studies",
]
