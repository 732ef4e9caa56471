"""A DICOM file re-encoded as JPEG Lossless Process 14 SV1 (.4.70), the competition's compressed syntax, by GDCM.

For building test and benchmark studies that look like the competition's files. GDCM (``python-gdcm``, optional
here) is imported when a file is encoded.
"""

from __future__ import annotations

from pathlib import Path

from cspine_submit.read.slice_header import DicomReadError


def compress_jpeg_lossless(src: str | Path, dst: str | Path) -> Path:
    """Re-encode one DICOM file as JPEG Lossless Process 14 SV1 (.4.70), the competition's compressed syntax.

    Only GDCM can write .4.70 among the Python DICOM libraries (pydicom's encoders cannot); used to build
    test and benchmark studies that look like the competition's files.

    Raises
    ------
    DicomReadError
        GDCM cannot read ``src`` or write ``dst``; the message names the file.
    """
    import gdcm

    src, dst = Path(src), Path(dst)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    if not reader.Read():
        raise DicomReadError(f"{src}: GDCM cannot read this file")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise DicomReadError(f"{src}: GDCM cannot re-encode this file as JPEG Lossless SV1")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise DicomReadError(f"{dst}: GDCM cannot write this file")
    return dst
