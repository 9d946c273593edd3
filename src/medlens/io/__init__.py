"""Reading and writing medical images: DICOM, NIfTI, PNG/JPEG/TIFF; the bad-files report.

``read_image`` and ``iter_inputs`` are the entry points; ``write_nifti`` writes a map back in the
geometry of its input. Datasets and transforms for training live in ``medlens.data.datasets``.
"""

from medlens.io.atomic import atomic_path, write_bytes, write_text
from medlens.io.dicom import CHEST_RADIOGRAPH, POLICIES, HeaderPolicy, read_dicom, read_dicom_series
from medlens.io.dicom_out import write_dicom
from medlens.io.images import read_picture, write_picture
from medlens.io.loading import Loaded, expand_inputs, is_readable, iter_inputs, read_image
from medlens.io.nifti import read_nifti, write_nifti
from medlens.io.report import BadFilesReport, write_bad_files

__all__ = [
    "BadFilesReport", "CHEST_RADIOGRAPH", "POLICIES", "HeaderPolicy", "Loaded", "atomic_path", "expand_inputs", "is_readable",
    "iter_inputs", "read_dicom", "read_dicom_series", "read_image", "read_nifti", "read_picture",
    "write_bad_files", "write_bytes", "write_dicom", "write_nifti", "write_picture", "write_text",
]
