"""Studies to test and train on: synthetic anatomy and studies, the DICOM writer, real volumes -> competition-style
studies (cut, resampled and written as the competition's are)."""

from cspine_submit.datasets.synthetic import SyntheticDataset, generate_dataset
from cspine_submit.datasets.volume_study import write_studies

__all__ = ["SyntheticDataset", "generate_dataset", "write_studies"]
