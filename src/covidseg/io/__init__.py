"""CT input/output: the one package that knows file formats.

Reads NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd), NRRD (.nrrd, .nhdr), single DICOM files and
DICOM series folders into :class:`CTVolume` -- a float32 array in Hounsfield units (HU) in the
canonical orientation (see :mod:`covidseg.imaging.geometry`) that remembers the native geometry, so results
can be written back onto the original scan exactly. Every header is checked before ITK allocates
pixels or guesses a geometry (docs/robustness.md lists what is refused and why).

Modules: :mod:`~covidseg.io.discover` (finding cases), :mod:`~covidseg.io.headers` (size, direction
and voxel-size checks for every format), :mod:`~covidseg.io.nifti` (qform/sform rules),
:mod:`~covidseg.io.dicom` (series checks, MONOCHROME1), :mod:`~covidseg.io.volumes` (read and
write arrays with their geometry).
"""

from covidseg.io.dicom import DICOM_IDENTIFIERS, dicom_identifiers, list_dicom_series
from covidseg.io.discover import DICOM_SUFFIXES, IMAGE_2D_SUFFIXES, VOLUME_SUFFIXES, case_id_of, find_cases
from covidseg.io.headers import MAX_VOXELS, NONFINITE
from covidseg.io.volumes import CTVolume, read_ct, read_labels, read_mask, write_array, write_image

__all__ = [
    "DICOM_IDENTIFIERS", "DICOM_SUFFIXES", "IMAGE_2D_SUFFIXES", "MAX_VOXELS", "NONFINITE",
    "VOLUME_SUFFIXES", "CTVolume", "case_id_of", "dicom_identifiers", "find_cases", "list_dicom_series",
    "read_ct", "read_labels", "read_mask", "write_array", "write_image",
]  # fmt: skip
