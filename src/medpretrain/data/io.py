"""Reading and writing 3D medical images in one convention.

Every reader returns an :class:`Image3D`: a channel-first ``(C, X, Y, Z)`` array and a 4x4
voxel-to-world affine in nibabel's RAS+ convention, whatever the file format. NIfTI and MGZ
are read with nibabel; NRRD, MHA/MHD and DICOM series with SimpleITK, whose LPS
direction/origin are converted to RAS so that the same voxel lies at the same world position
whichever format the scan came in.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medpretrain.atomic import atomic_path
from medpretrain.errors import DataError

# Suffixes read by nibabel and by SimpleITK. Longest first so ".nii.gz" wins over ".gz".
NIBABEL_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")
IMAGE_SUFFIXES = NIBABEL_SUFFIXES + ITK_SUFFIXES

# ITK's world frame is LPS, nibabel's is RAS: flip the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Image3D:
    """A 3D image (possibly with several channels) and where it lies in the world.

    Attributes:
        array: ``(C, X, Y, Z)`` numeric array, channel first, ``C >= 1``.
        affine: 4x4 voxel index -> world (mm) matrix in nibabel's RAS+ convention.
        path: the file or DICOM folder it was read from, if any.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel sizes in mm along the array's three spatial axes (norms of the affine columns)."""
        return affine_spacing(self.affine)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """``(X, Y, Z)``: the array's shape without the channel axis."""
        return tuple(int(s) for s in self.array.shape[1:4])  # type: ignore[return-value]

    @property
    def num_channels(self) -> int:
        """Number of channels ``C``."""
        return int(self.array.shape[0])


def affine_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes (mm) along the three voxel axes of a 4x4 affine.

    Args:
        affine: 4x4 voxel -> world matrix.
    """
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.linalg.norm(a[:3, :3], axis=0))  # type: ignore[return-value]


def image_suffix(path: str | os.PathLike) -> str:
    """The recognised image suffix of a file name (``".nii.gz"``, ``".nrrd"``, ...), or ``""``.

    Args:
        path: a file name or path.
    """
    name = Path(path).name.lower()
    for suffix in IMAGE_SUFFIXES + DICOM_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def strip_image_suffix(name: str) -> str:
    """A file name without its image suffix (``"case_1.nii.gz"`` -> ``"case_1"``).

    Unknown suffixes are stripped like ``Path.stem`` would, with a trailing ``.gz`` removed first.

    Args:
        name: a file name (not a path).
    """
    suffix = image_suffix(name)
    if suffix:
        return name[: len(name) - len(suffix)]
    if name.lower().endswith(".gz"):
        name = name[:-3]
    return Path(name).stem if "." in name else name


def is_dicom_file(path: Path) -> bool:
    """True when the file starts with a DICOM preamble (``DICM`` at byte 128) or ends in ``.dcm``.

    Args:
        path: the file to check.
    """
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _reason(exc: BaseException) -> str:
    """A library exception as one line (ITK and nibabel messages span several lines)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    # ITK puts file/line noise first and the actual problem last.
    if lines and lines[0].startswith("Exception thrown in SimpleITK"):
        lines = lines[-1:]
    return " ".join(lines) or type(exc).__name__


def _check_spacing(spacing, path: Path) -> None:
    sp = np.asarray(spacing, dtype=np.float64)
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise DataError(
            f"{path}: voxel spacing {tuple(float(v) for v in sp)} in the header is zero, negative or "
            "NaN; fix the header (e.g. set pixdim / spacing to the true voxel size) and re-run"
        )


def _stored_zooms(img) -> tuple:
    """The voxel sizes a nibabel image's affine is built from, as stored in the file.

    nibabel silently loads a zero pixdim as 1 and a negative one as its absolute value. A NIfTI
    without an sform builds its affine from pixdim, so such a file would get a made-up voxel size:
    read the stored pixdim instead, for ``_check_spacing`` to refuse.
    """
    import nibabel as nib

    hdr = img.header
    if isinstance(hdr, nib.Nifti1Header) and int(hdr["sform_code"]) == 0:
        holder = img.file_map.get("header", img.file_map["image"])
        with holder.get_prepare_fileobj("rb") as f:
            return type(hdr).from_fileobj(f, check=False).get_zooms()
    return hdr.get_zooms()


def _format_name(path: Path) -> str:
    suffix = image_suffix(path)
    return {
        ".nii.gz": "NIfTI",
        ".nii": "NIfTI",
        ".mgz": "MGZ",
        ".mgh": "MGH",
        ".nrrd": "NRRD",
        ".nhdr": "NRRD",
        ".mha": "MetaImage",
        ".mhd": "MetaImage",
    }.get(suffix, "image")


def _check_scaling_overflow(data: np.ndarray, proxy, slope, inter, path: Path) -> None:
    """Refuse a header whose intensity scaling (``scl_slope``/``scl_inter``) turns finite stored values into
    Inf/NaN: the voxels are fine, the header is wrong, and treating them as NaN voxels (``--nan-policy zero``)
    would empty the image."""
    bad = ~np.isfinite(data)
    if not bad.any():
        return
    stored = np.asarray(proxy.get_unscaled())
    overflowed = int((bad & np.isfinite(stored)).sum()) if np.issubdtype(stored.dtype, np.floating) else int(bad.sum())
    if overflowed:
        raise DataError(
            f"{path}: the header's intensity scaling (scl_slope={float(slope):g}, scl_inter={float(inter):g}) turns "
            f"{overflowed} finite stored voxels into Inf/NaN (beyond float32); the header is wrong, not the voxels: "
            "fix scl_slope/scl_inter (e.g. 1 and 0) and re-run"
        )


def _read_nibabel(path: Path) -> Image3D:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        header_zooms = _stored_zooms(img)
        proxy = img.dataobj
        slope = getattr(proxy, "slope", 1.0)
        inter = getattr(proxy, "inter", 0.0)
        on_disk = img.get_data_dtype()
        identity_scaling = (slope in (None, 1.0) or not np.isfinite(slope)) and (
            inter in (None, 0.0) or not np.isfinite(inter)
        )
        if np.issubdtype(on_disk, np.integer) and identity_scaling:
            # Labels must stay exact integers: no float round trip when no scaling is stored.
            data = np.asarray(proxy)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # overflow in the cast: reported below, in words
                data = img.get_fdata(dtype=np.float32)
            if not identity_scaling:
                _check_scaling_overflow(data, proxy, slope, inter, path)
        affine = np.asarray(img.affine, dtype=np.float64)
    except DataError:
        raise
    except Exception as exc:  # nibabel raises many types for broken files
        raise DataError(
            f"cannot read {path}: {_reason(exc)}; is it a complete {_format_name(path)} file? "
            "(re-export or re-download it)"
        ) from exc
    _check_spacing(header_zooms[:3] if len(header_zooms) >= 3 else header_zooms, path)
    return _to_image3d(data, affine, path)


def _to_image3d(data: np.ndarray, affine: np.ndarray, path: Path | None) -> Image3D:
    """Turn a spatial-first array ``(X, Y, Z[, T[, C]])`` into a channel-first Image3D."""
    name = path if path is not None else "image"
    if data.ndim < 3:
        raise DataError(
            f"{name}: is a {data.ndim}D image of shape {tuple(data.shape)}; a 3D volume is needed "
            "(pass the whole volume, not a single slice)"
        )
    if data.ndim == 3:
        arr = data[None]
    elif data.ndim == 4:
        arr = np.moveaxis(data, 3, 0)
    elif data.ndim == 5 and data.shape[3] == 1:
        # NIfTI vector images store components in the 5th dimension with a singleton time axis.
        arr = np.moveaxis(data[:, :, :, 0, :], 3, 0)
    else:
        raise DataError(
            f"{name}: has shape {tuple(data.shape)}; only 3D volumes or 4D (3D x channels) are "
            "supported (split the extra dimensions into separate files)"
        )
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise DataError(f"{name}: voxel type {arr.dtype} is not numeric; convert the image to a numeric type")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    spacing = affine_spacing(affine)
    _check_spacing(spacing, Path(str(name)))
    return Image3D(array=np.ascontiguousarray(arr), affine=affine, path=path)


def itk_to_ras_affine(spacing, direction, origin) -> np.ndarray:
    """Build a nibabel RAS affine from ITK's LPS spacing, direction and origin.

    Args:
        spacing: 3 voxel sizes (ITK order x, y, z).
        direction: 9 numbers, row-major 3x3 direction cosines (ITK's ``GetDirection``).
        origin: 3 numbers, world position (LPS) of voxel (0, 0, 0).
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = _LPS_TO_RAS @ d @ np.diag(np.asarray(spacing, dtype=np.float64))
    aff[:3, 3] = _LPS_TO_RAS @ np.asarray(origin, dtype=np.float64)
    return aff


def ras_affine_to_itk(affine: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """Inverse of :func:`itk_to_ras_affine`: ``(spacing, direction (9), origin)`` in ITK's LPS.

    Args:
        affine: 4x4 RAS voxel -> world matrix.
    """
    a = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    d = _LPS_TO_RAS @ a[:3, :3] / spacing
    origin = _LPS_TO_RAS @ a[:3, 3]
    return tuple(spacing.tolist()), tuple(d.ravel().tolist()), tuple(origin.tolist())


def _sitk_to_image3d(img, path: Path) -> Image3D:
    import SimpleITK as sitk

    dim = img.GetDimension()
    if dim < 3:
        raise DataError(
            f"{path}: is a {dim}D image of size {img.GetSize()}; a 3D volume is needed "
            "(pass the whole volume, not a single slice)"
        )
    data = sitk.GetArrayFromImage(img)  # (Z, Y, X[, comp]) for 3D, (T, Z, Y, X[, comp]) for 4D
    ncomp = img.GetNumberOfComponentsPerPixel()
    if dim == 3:
        if ncomp > 1:
            data = np.transpose(data, (2, 1, 0, 3))  # X, Y, Z, C
        else:
            data = np.transpose(data, (2, 1, 0))
        spacing = img.GetSpacing()
        direction = img.GetDirection()
        origin = img.GetOrigin()
    elif dim == 4 and ncomp == 1:
        data = np.transpose(data, (3, 2, 1, 0))  # X, Y, Z, T: time becomes channels
        spacing = img.GetSpacing()[:3]
        direction = np.asarray(img.GetDirection()).reshape(4, 4)[:3, :3].ravel()
        origin = img.GetOrigin()[:3]
    else:
        raise DataError(
            f"{path}: {dim}D image with {ncomp} components per voxel is not supported; "
            "split it into 3D volumes (one per channel)"
        )
    _check_spacing(spacing, path)
    affine = itk_to_ras_affine(spacing, direction, origin)
    return _to_image3d(np.asarray(data), affine, path)


def _read_itk_file(path: Path) -> Image3D:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except Exception as exc:  # SimpleITK raises RuntimeError with ITK's message
        raise DataError(
            f"cannot read {path}: {_reason(exc)}; is it a complete {_format_name(path)} file? "
            "(re-export or re-download it)"
        ) from exc
    return _sitk_to_image3d(img, path)


def dicom_series_ids(folder: Path) -> list[str]:
    """The DICOM series instance UIDs found directly in ``folder`` (not recursive).

    Args:
        folder: a folder of DICOM files.
    """
    import SimpleITK as sitk

    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])


def _read_dicom_folder(folder: Path) -> Image3D:
    import SimpleITK as sitk

    try:
        ids = dicom_series_ids(folder)
    except Exception as exc:
        raise DataError(f"cannot read DICOM folder {folder}: {_reason(exc)}; is it a folder of DICOM files?") from exc
    if not ids:
        raise DataError(
            f"{folder}: no DICOM series found in this folder; pass a folder that directly holds the "
            ".dcm files of one series, or an image file"
        )
    if len(ids) > 1:
        raise DataError(
            f"{folder}: holds {len(ids)} DICOM series ({', '.join(ids)}); pass one series folder "
            "(move each series into its own folder)"
        )
    try:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        img = reader.Execute()
    except Exception as exc:
        raise DataError(
            f"cannot read DICOM series {ids[0]} in {folder}: {_reason(exc)}; is the series complete?"
        ) from exc
    if img.GetDimension() == 3 and img.GetSize()[2] == 1:
        raise DataError(
            f"{folder}: the DICOM series has a single slice; a 3D volume is needed "
            "(pass a folder with all slices of the series)"
        )
    return _sitk_to_image3d(img, folder)


def read_image(path: str | os.PathLike) -> Image3D:
    """Read a 3D (or 4D = multi-channel) image into RAS, channel first.

    Args:
        path: a NIfTI (``.nii``, ``.nii.gz``), MGZ, NRRD, MHA/MHD file, or a folder holding
            one DICOM series.

    Returns:
        The image; a 3D file gives ``C = 1``, a 4D file ``C = t``.

    Raises:
        DataError: the file is missing, unreadable or truncated, is 2D, or has a zero,
            negative or NaN voxel spacing; a DICOM folder holds several series.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder; check the path")
    if p.is_dir():
        return _read_dicom_folder(p)
    suffix = image_suffix(p)
    if suffix in NIBABEL_SUFFIXES:
        return _read_nibabel(p)
    if suffix in ITK_SUFFIXES:
        return _read_itk_file(p)
    if suffix in DICOM_SUFFIXES or is_dicom_file(p):
        return _read_dicom_folder(p.parent)
    raise DataError(
        f"{p}: unknown image format; use NIfTI (.nii/.nii.gz), MGZ, NRRD, MHA/MHD or a DICOM series folder"
    )


def read_header(path: str | os.PathLike) -> tuple[tuple[int, int, int], int, np.ndarray]:
    """Read only the geometry of an image: cheap for NIfTI/MGZ/NRRD/MHA (no voxel data).

    Args:
        path: as for :func:`read_image`.

    Returns:
        ``(spatial_shape, num_channels, affine)`` with the affine in RAS, as :func:`read_image`
        would give.

    Raises:
        DataError: as for :func:`read_image` (a DICOM folder is read in full).
    """
    p = Path(path)
    suffix = image_suffix(p)
    if p.is_file() and suffix in NIBABEL_SUFFIXES:
        import nibabel as nib

        try:
            img = nib.load(str(p))
            shape = tuple(int(s) for s in img.shape)
            affine = np.asarray(img.affine, dtype=np.float64)
            zooms = _stored_zooms(img)
        except Exception as exc:
            raise DataError(
                f"cannot read {p}: {_reason(exc)}; is it a complete {_format_name(p)} file? (re-export or re-download it)"
            ) from exc
        if len(shape) < 3:
            raise DataError(
                f"{p}: is a {len(shape)}D image of shape {shape}; a 3D volume is needed "
                "(pass the whole volume, not a single slice)"
            )
        _check_spacing(zooms[:3], p)
        # An sform with a zero column has a zero voxel size whatever pixdim says.
        _check_spacing(affine_spacing(affine), p)
        if len(shape) == 3:
            channels = 1
        elif len(shape) == 5 and shape[3] == 1:
            channels = shape[4]
        elif len(shape) == 4:
            channels = shape[3]
        else:
            raise DataError(
                f"{p}: has shape {shape}; only 3D or 4D (3D x channels) images are supported "
                "(split the extra dimensions into separate files)"
            )
        return shape[:3], int(channels), affine  # type: ignore[return-value]
    if p.is_file() and suffix in ITK_SUFFIXES:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        try:
            reader.ReadImageInformation()
        except Exception as exc:
            raise DataError(
                f"cannot read {p}: {_reason(exc)}; is it a complete {_format_name(p)} file? (re-export or re-download it)"
            ) from exc
        dim = reader.GetDimension()
        size = reader.GetSize()
        if dim < 3:
            raise DataError(
                f"{p}: is a {dim}D image of size {size}; a 3D volume is needed "
                "(pass the whole volume, not a single slice)"
            )
        if dim == 3:
            spacing, direction, origin = reader.GetSpacing(), reader.GetDirection(), reader.GetOrigin()
            channels = reader.GetNumberOfComponents()
        else:
            spacing = reader.GetSpacing()[:3]
            direction = np.asarray(reader.GetDirection()).reshape(dim, dim)[:3, :3].ravel()
            origin = reader.GetOrigin()[:3]
            channels = size[3]
        _check_spacing(spacing, p)
        return tuple(int(s) for s in size[:3]), int(channels), itk_to_ras_affine(spacing, direction, origin)  # type: ignore[return-value]
    img = read_image(p)
    return img.spatial_shape, img.num_channels, img.affine


def _nifti_dtype(array: np.ndarray, dtype) -> np.dtype:
    if dtype is not None:
        return np.dtype(dtype)
    dt = array.dtype
    if dt == np.bool_:
        return np.dtype(np.uint8)
    if dt in (np.int64, np.uint64):
        # nibabel refuses 64-bit ints without an explicit choice; most readers dislike them too.
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for cand in (np.uint8, np.int16, np.int32):
            info = np.iinfo(cand)
            if info.min <= lo and hi <= info.max:
                return np.dtype(cand)
        return np.dtype(np.float64)
    return np.dtype(dt)


def write_nifti(array3d: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype=None) -> Path:
    """Write a NIfTI file atomically (temporary file in the same folder, then ``os.replace``).

    Args:
        array3d: ``(X, Y, Z)`` array; a channel-first ``(C, X, Y, Z)`` array is written as a 4D
            NIfTI ``(X, Y, Z, C)``.
        affine: 4x4 RAS voxel -> world matrix.
        path: destination (``.nii`` or ``.nii.gz``); missing parent folders are created.
        dtype: on-disk voxel type; default the array's own (bool -> uint8, int64 -> the
            smallest integer type that holds the values).

    Returns:
        The written path.
    """
    import nibabel as nib

    arr = np.asarray(array3d)
    if arr.ndim == 4:
        arr = np.moveaxis(arr, 0, 3)
    elif arr.ndim != 3:
        raise DataError(f"write_nifti: expected a 3D (X, Y, Z) or 4D (C, X, Y, Z) array, got shape {arr.shape}")
    out_dtype = _nifti_dtype(arr, dtype)
    arr = arr.astype(out_dtype, copy=False)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if p.name.lower().endswith(".gz") else ".nii"
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.set_qform(np.asarray(affine, dtype=np.float64), code=1)
    img.set_sform(np.asarray(affine, dtype=np.float64), code=1)
    img.set_data_dtype(out_dtype)
    # The temporary keeps the real suffix so nibabel picks the same compression.
    with atomic_path(p, keep_suffix=suffix) as tmp:
        nib.save(img, tmp)
    return p
