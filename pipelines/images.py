"""Image files to pixel values: ONE intensity rule for every domain that reads images.

The rule (``intensity="bit_depth"``, the default) maps what a file stores to [0, 1] by the range
its format can hold, never by the image's own minimum and maximum, so the same picture gives the
same values whatever bit depth or format it was saved in (within quantisation: 1/255 at 8 bits):

- **integer pixels** are divided by their bit depth's maximum, ``value / (2**bits - 1)``: 8-bit
  PNG/JPEG/BMP/TIFF by 255, 16-bit PNG/TIFF by 65535, a DICOM by ``2**BitsStored - 1``, a NIfTI of
  ``uint8``/``uint16`` by 255/65535. An 8-bit ``v`` and a 16-bit ``257 v`` give exactly ``v / 255``.
- **floating-point pixels** (NIfTI, TIFF ``F``) are taken as already in [0, 1]; values outside are
  refused (nothing is clipped), as are NaN, inf and magnitudes beyond float32's range.
- **physical units** are refused unless the user says how to map them: a DICOM whose Modality LUT
  is not the identity (``RescaleSlope``/``RescaleIntercept``, e.g. CT in Hounsfield units with
  intercept -1024), signed DICOM pixels (``PixelRepresentation`` 1) and signed-integer NIfTI. The
  same Hounsfield value is stored differently by different scanners (unsigned with intercept -1024,
  or signed with intercept 0), so no bit-depth rule can map it consistently, and a fixed cut-off
  would silently clip bone or air. Choose:

  - ``intensity_range=(low, high)`` (``intensity="range"``): ``(value - low) / (high - low)``
    clipped to [0, 1], on the values after the Modality LUT (Hounsfield units for CT), the same for
    every file: ``(-1024, 3071)`` keeps the whole 12-bit CT range, ``(-160, 240)`` is a soft-tissue
    window. Values outside the range are clipped: that is what a window is.
  - ``intensity="dicom_window"``: each DICOM's own ``WindowCenter``/``WindowWidth`` (the first when
    there are several; DICOM PS3.3 C.11.2.1.2 linear function), clipped to [0, 1]; a file without a
    window, or a file that is not DICOM, is refused.
  - ``intensity="minmax"``: each image's own minimum -> 0 and maximum -> 1 (MRI in arbitrary scanner
    units); a constant image is refused. Brightness is then not comparable between images.

- ``MONOCHROME1`` DICOMs (low values bright) are inverted so that bright means bright everywhere.
- 1-bit images read as 0 and 1; palette, alpha and CMYK images are converted to RGB (8-bit) first.

Arrays come back channel-first, ``(C, *spatial)``: ``uint8`` when the file holds 8-bit values under
``bit_depth`` (value ``v`` stands for ``v / 255``; it keeps memory small) and ``float32`` in [0, 1]
otherwise; :func:`unit_float` turns either into float32. Every problem is an
:class:`pipelines.errors.InputError` naming the file.

Example:
    >>> import numpy as np
    >>> scale_integers(np.array([0, 257, 65535], dtype=np.uint16), 16).tolist()
    [0.0, 0.003921568859368563, 1.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipelines.errors import InputError
from pipelines.validation import FLOAT32_MAX, describe_rows, non_finite_problem

IntensityMode = Literal["bit_depth", "dicom_window", "range", "minmax"]
INTENSITY_MODES = ("bit_depth", "dicom_window", "range", "minmax")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm",)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: PIL modes read as one channel (every other mode is read as RGB, alpha dropped)
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_PHYSICAL_HINT = (
    "choose how they map to [0, 1]: --data.intensity_range LOW HIGH (e.g. -1024 3071 keeps the whole CT range in "
    "Hounsfield units, -160 240 is a soft-tissue window), --data.intensity dicom_window (each file's WindowCenter/"
    "WindowWidth) or --data.intensity minmax (each image's own range)"
)


@dataclass(frozen=True)
class Intensity:
    """How stored values become [0, 1] (see the module documentation).

    Args:
        mode: ``bit_depth`` (default), ``dicom_window``, ``range`` or ``minmax``.
        range: ``(low, high)`` for ``range`` (giving a range selects that mode).
    """

    mode: IntensityMode = "bit_depth"
    range: tuple[float, float] | None = None

    @classmethod
    def from_options(cls, mode: str | None, value_range: Any) -> Intensity:
        """Validate the data options ``intensity`` and ``intensity_range`` (InputError naming them)."""
        mode = mode or ("range" if value_range is not None else "bit_depth")
        if mode not in INTENSITY_MODES:
            raise InputError(f"--data.intensity {mode!r} is not one of {list(INTENSITY_MODES)}")
        if value_range is not None:
            try:
                low, high = (float(v) for v in value_range)
            except (TypeError, ValueError):
                raise InputError(f"--data.intensity_range must be two numbers LOW HIGH, got {value_range!r}") from None
            if not (np.isfinite(low) and np.isfinite(high) and low < high):
                raise InputError(f"--data.intensity_range must be two finite numbers with LOW < HIGH, got [{low:g}, {high:g}]")
            if mode != "range":
                raise InputError(f"--data.intensity_range is used by --data.intensity range only, not {mode!r}")
            return cls("range", (low, high))
        if mode == "range":
            raise InputError("--data.intensity range needs --data.intensity_range LOW HIGH")
        return cls(mode)  # type: ignore[arg-type]


def open_npz(path: Path, option: str = "npz_path") -> Any:
    """An ``.npz`` opened without pickles (``with open_npz(path) as npz``); a missing or unreadable
    file is an :class:`InputError` naming ``option`` and the path."""
    if not path.is_file():
        raise InputError(f"{option} {path}: file not found")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as error:
        raise InputError(f"{option} {path}: not a readable .npz file ({error})") from None


def scale_integers(array: np.ndarray, bits: int) -> np.ndarray:
    """``value / (2**bits - 1)`` as float32: the bit-depth rule."""
    return (array.astype(np.float64) / float(2**bits - 1)).astype(np.float32)


def unit_float(array: np.ndarray) -> np.ndarray:
    """An array from :func:`read_image` as float32 in [0, 1] (uint8 means ``v / 255``)."""
    return array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32, copy=False)


def check_finite_pixels(images: np.ndarray, where: str, first_item: int = 0, noun: str = "item") -> None:
    """Refuse NaN, inf and float32 overflow in ``images`` (items first), naming the items.

    Example:
        >>> check_finite_pixels(np.array([[0.0, 1.0], [np.nan, 0.5]]), "x.npz: array 'train_images'")
        Traceback (most recent call last):
        ...
        pipelines.errors.InputError: x.npz: array 'train_images' holds NaN at item 1 (0-based index); every pixel must be a finite number within float32's range (|x| <= 3.4e+38)
    """
    images = np.asarray(images)
    if images.size == 0 or images.dtype.kind not in "fciu":
        return
    found = non_finite_problem(images.reshape(len(images), -1))
    if found is None:
        return
    mask, what = found
    items = describe_rows(np.flatnonzero(mask) + first_item).replace("row", noun, 1)
    base = " (0-based index)" if first_item == 0 else ""
    raise InputError(f"{where} holds {what} at {items}{base}; every pixel must be a finite number within float32's range (|x| <= {FLOAT32_MAX:.2g})")


def _finite_image(values: np.ndarray, where: str) -> None:
    found = non_finite_problem(values.reshape(1, -1))
    if found is not None:
        count = int((~np.isfinite(values.astype(np.float64)) | (np.abs(values.astype(np.float64)) > FLOAT32_MAX)).sum())
        raise InputError(f"{where}: holds {found[1]} in {count} pixel(s); every pixel must be a finite number within float32's range")


def _map(values: np.ndarray, intensity: Intensity, where: str, window: tuple[float, float] | None = None) -> np.ndarray:
    """Physical or raw values -> [0, 1] for the modes that do not use the bit depth."""
    values = values.astype(np.float64)
    if intensity.mode == "range":
        low, high = intensity.range  # type: ignore[misc]
        return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)
    if intensity.mode == "dicom_window":
        if window is None:
            raise InputError(f"{where}: --data.intensity dicom_window needs a DICOM file with WindowCenter and WindowWidth")
        center, width = window
        return np.clip((values - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5, 0.0, 1.0).astype(np.float32)
    low, high = float(values.min()), float(values.max())  # minmax
    if high <= low:
        raise InputError(f"{where}: every pixel holds {low:g}, so --data.intensity minmax (each image's own range) is undefined")
    return ((values - low) / (high - low)).astype(np.float32)


def _floats(values: np.ndarray, intensity: Intensity, where: str) -> np.ndarray:
    _finite_image(values, where)
    if intensity.mode != "bit_depth":
        return _map(values, intensity, where)
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise InputError(
            f"{where}: floating-point pixels span [{low:g}, {high:g}]; floats are read as intensities in [0, 1] and nothing "
            f"is clipped: {_PHYSICAL_HINT}"
        )
    return values.astype(np.float32)


def _pil_bits(image: Any, array: np.ndarray) -> int:
    if image.mode.startswith("I;16"):
        return 16
    if image.mode == "I":  # 32-bit integers: TIFF says how many bits are used; PNG holds at most 16
        if image.format == "TIFF":
            bits = image.tag_v2.get(258, 32)
            return int(bits[0] if isinstance(bits, tuple) else bits)
        return 16 if image.format == "PNG" else 32
    return array.dtype.itemsize * 8


def read_pil(path: Path, intensity: Intensity = Intensity()) -> np.ndarray:
    """A PNG/JPEG/BMP/TIFF file, channel-first: uint8 for 8-bit files (bit_depth), float32 in [0, 1] otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("1", "LA", "La"):
                image = image.convert("L")
            elif image.mode not in GRAY_MODES and image.mode != "RGB":
                image = image.convert("RGB")  # palette, alpha, CMYK, YCbCr...: 8-bit RGB
            array = np.asarray(image)
            bits = _pil_bits(image, array)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise InputError(f"cannot read image {path} (unreadable or truncated): {error}") from None
    array = np.moveaxis(array, -1, 0) if array.ndim == 3 else array[None]
    where = f"image {path}"
    if array.dtype.kind == "f":
        return _floats(array, intensity, where)
    if intensity.mode != "bit_depth":
        return _map(array, intensity, where)
    if array.dtype == np.uint8:
        return array
    if array.min() < 0 or array.max() > 2**bits - 1:
        raise InputError(f"{where}: {bits}-bit integer pixels span [{array.min()}, {array.max()}], outside [0, {2**bits - 1}]; {_PHYSICAL_HINT}")
    return scale_integers(array, bits)


def _dicom_window(ds: Any) -> tuple[float, float] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    first = lambda v: float(v[0]) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else float(v)  # noqa: E731
    return first(center), first(width)


def read_dicom(path: Path, intensity: Intensity = Intensity()) -> np.ndarray:
    """A DICOM file (one frame: ``(C, H, W)``; several frames: a ``(1, F, H, W)`` volume), float32 in [0, 1]."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    where = f"DICOM {path}"
    try:
        ds = pydicom.dcmread(path)
        stored = np.asarray(ds.pixel_array)
    except (InvalidDicomError, AttributeError, KeyError, OSError, ValueError, RuntimeError, NotImplementedError) as error:
        raise InputError(f"cannot read {where} (not DICOM, no pixel data, or a compression without a decoder): {error}") from None
    samples = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if samples > 1:
        if stored.ndim != 3:
            raise InputError(f"{where}: {frames} colour frames of shape {stored.shape}; colour volumes are not supported")
        stored = np.moveaxis(stored, -1, 0)  # (H, W, 3) -> (3, H, W)
    else:
        stored = stored[None]  # (1, H, W) or (1, F, H, W)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", stored.dtype.itemsize * 8)))
    if stored.dtype.kind == "f":
        values = _floats(stored, intensity, where)
    elif intensity.mode == "bit_depth":
        if signed or (slope, intercept) != (1.0, 0.0):
            units = f"RescaleSlope {slope:g}, RescaleIntercept {intercept:g}" + (", signed pixels" if signed else "")
            raise InputError(f"{where}: stores values in physical units ({units}; Modality {ds.get('Modality', '?')}), which the bit-depth rule cannot map: {_PHYSICAL_HINT}")
        if int(stored.max()) > 2**bits - 1:
            raise InputError(f"{where}: BitsStored is {bits} but pixels reach {int(stored.max())}; the file's header is inconsistent")
        values = scale_integers(stored, bits)
    else:
        values = _map(stored.astype(np.float64) * slope + intercept, intensity, where, _dicom_window(ds))
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        values = 1.0 - values
    return values


def read_nifti(path: Path, intensity: Intensity = Intensity()) -> np.ndarray:
    """A NIfTI file: ``(1, X, Y, Z)`` (a ``(X, Y, 1)`` slice is ``(1, X, Y)``), float32 in [0, 1] or uint8."""
    import nibabel as nib

    where = f"NIfTI {path}"
    try:
        image = nib.load(str(path))
        values = np.asanyarray(image.dataobj)  # scl_slope/scl_inter applied (floats) when the header sets them
    except Exception as error:  # nibabel raises many types for broken files
        raise InputError(f"cannot read {where}: {error}") from None
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    values = values[None]
    if intensity.mode == "dicom_window":
        raise InputError(f"{where}: --data.intensity dicom_window reads DICOM windows; a NIfTI file has none")
    if values.dtype.kind == "f":
        return _floats(values, intensity, where)
    if intensity.mode != "bit_depth":
        return _map(values, intensity, where)
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.uint16:
        return scale_integers(values, 16)
    raise InputError(f"{where}: stores {values.dtype} integers (signed or wider than 16 bits: physical units such as Hounsfield units or scanner units); {_PHYSICAL_HINT}")


def read_image(path: str | Path, intensity: Intensity = Intensity()) -> np.ndarray:
    """Read any supported file by its suffix, channel-first, by the intensity rule."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(DICOM_SUFFIXES):
        return read_dicom(path, intensity)
    if name.endswith(NIFTI_SUFFIXES):
        return read_nifti(path, intensity)
    if intensity.mode == "dicom_window":
        raise InputError(f"image {path}: --data.intensity dicom_window reads DICOM windows; {path.suffix} files have none")
    return read_pil(path, intensity)


#: :func:`value_units`' kinds: what a file's numbers are before ``--data.intensity range`` maps them
CODES, PHYSICAL, FLOATS = "pixel codes", "physical units", "floating-point values"


def value_units(path: str | Path) -> tuple[str, str]:
    """``(kind, description)`` of the numbers a file stores, for ``--data.intensity range`` (one LOW HIGH for every
    file): :data:`CODES` (PNG/JPEG/BMP/TIFF, a DICOM whose Modality LUT is the identity, an unsigned unscaled NIfTI),
    :data:`PHYSICAL` (a DICOM's rescale or signed pixels, a signed or scaled NIfTI: Hounsfield units for CT whatever
    the scanner stored) or :data:`FLOATS` (a float NIfTI). A data set mixing kinds puts them in different bands of
    [0, 1] in silence (trial finding: 8-bit PNGs read as Hounsfield units all landed between "air" and "water").
    Only the header is read; a file it cannot read counts as codes (reading its pixels then names the problem).

    Example:
        >>> value_units("scan.png")
        ('pixel codes', 'pixel codes (PNG)')
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(DICOM_SUFFIXES):
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # pydicom raises many types for broken files; the pixel read names the problem
            return CODES, f"{CODES} (DICOM)"
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        if (slope, intercept) == (1.0, 0.0) and not signed:
            return CODES, f"{CODES} (DICOM without a Modality LUT: RescaleSlope 1, RescaleIntercept 0)"
        return PHYSICAL, f"{PHYSICAL} (DICOM RescaleSlope {slope:g}, RescaleIntercept {intercept:g}{', signed pixels' if signed else ''})"
    if name.endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        try:
            header = nib.load(str(path)).header
            dtype, (slope, intercept) = header.get_data_dtype(), header.get_slope_inter()
        except Exception:  # nibabel raises many types for broken files
            return CODES, f"{CODES} (NIfTI)"
        scaled = slope not in (None, 1.0) or intercept not in (None, 0.0)
        if dtype.kind == "f" and not scaled:
            return FLOATS, f"{FLOATS} (NIfTI {dtype})"
        if dtype.kind == "u" and not scaled:
            return CODES, f"{CODES} (NIfTI {dtype})"
        return PHYSICAL, f"{PHYSICAL} (NIfTI {dtype}{f', scl_slope {slope:g}, scl_inter {intercept:g}' if scaled else ', signed'})"
    return CODES, f"{CODES} ({path.suffix.lstrip('.').upper() or 'image'})"


def stored_bits(path: str | Path) -> int | None:
    """The bit depth ``bits`` whose maximum ``2**bits - 1`` the bit-depth rule divides a file's integer values by, from
    its header alone: 8 for 8-bit (and palette, RGB...) PNG/JPEG/BMP/TIFF and uint8 NIfTI, 16 for 16-bit PNG/TIFF and
    uint16 NIfTI, a TIFF's BitsPerSample for 32-bit integers, a DICOM's BitsStored. ``None`` for floating-point
    values, physical units (a rescaled or signed DICOM or NIfTI), a ``MONOCHROME1`` DICOM (its values are inverted)
    and a header that cannot be read (reading the pixels names that problem).

    Example:
        >>> stored_bits("missing.png") is None
        True
    """
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith(DICOM_SUFFIXES):
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if value_units(path)[0] != CODES or str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
                return None
            return int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
        if name.endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            header = nib.load(str(path)).header
            dtype, (slope, intercept) = header.get_data_dtype(), header.get_slope_inter()
            scaled = slope not in (None, 1.0) or intercept not in (None, 0.0)
            return {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(np.dtype(dtype)) if not scaled else None
        from PIL import Image

        with Image.open(path) as image:  # the header only: pixels are decoded by load()
            if image.mode == "F":
                return None
            return _pil_bits(image, np.zeros(0, np.uint8))  # modes other than I and I;16 hold 8-bit values
    except Exception:  # Pillow, pydicom and nibabel raise many types for broken files; the pixel read names the problem
        return None


def to_uint8(array: np.ndarray) -> np.ndarray:
    """An array from :func:`read_image` as uint8 (``round(255 x)``): 16-bit values quantised to 8 bits."""
    if array.dtype == np.uint8:
        return array
    return np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
