"""Tests for semsegloop.data.imageio: every supported format read from real files on disk, geometry
kept through round trips, and clear ImageReadError/LabelError messages for bad input."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image

from semsegloop import ImageReadError, LabelError, ProjectError
from semsegloop.data.imageio import (Geometry, ImageData, as_image_data, check_finite,
                                geometry_from_sitk, geometry_to_sitk, list_image_files,
                                natural_sort_key, read_image, read_labels, write_float_map,
                                write_image, write_labels)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

# A rotated, anisotropic, off-origin geometry: catches any (x,y,z)/(z,y,x) mix-up.
_c, _s = np.cos(0.3), np.sin(0.3)
ROTATED = Geometry(spacing=(6.5, 0.8, 0.7), origin=(-99.6, 12.25, -78.0),
                   direction=(_c, -_s, 0.0, _s, _c, 0.0, 0.0, 0.0, 1.0))


def _rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------- Geometry

def test_geometry_json_round_trip_and_matches():
    g = ROTATED
    g2 = Geometry.from_json(g.to_json())
    assert g2 == g and g2.matches(g)
    assert not g.matches(Geometry.identity((6.5, 0.8, 0.7)))
    assert not g.matches(Geometry(g.spacing, (-99.6, 12.25, -77.0), g.direction))
    assert Geometry.identity().spacing == (1.0, 1.0, 1.0)
    with pytest.raises(ProjectError, match="geometry"):
        Geometry.from_json({"spacing": [1, 1], "origin": [0, 0, 0], "direction": [1] * 9})
    with pytest.raises(ValueError):
        Geometry((0.0, 1.0, 1.0), (0, 0, 0), Geometry.identity().direction)


def test_geometry_sitk_axis_order():
    img = sitk.Image(7, 5, 3, sitk.sitkUInt8)   # x=7, y=5, z=3
    geometry_to_sitk(img, ROTATED)
    assert img.GetSpacing() == pytest.approx((0.7, 0.8, 6.5))
    assert sitk.GetArrayViewFromImage(img).shape == (3, 5, 7)
    assert geometry_from_sitk(img).matches(ROTATED)
    img2 = sitk.Image(7, 5, sitk.sitkUInt8)
    img2.SetSpacing((0.5, 0.25))
    img2.SetOrigin((3.0, 4.0))
    g2 = geometry_from_sitk(img2)
    assert g2.spacing == (1.0, 0.25, 0.5) and g2.origin == (3.0, 4.0, 0.0)
    assert g2.direction == Geometry.identity().direction


# ---------------------------------------------------------------- TIFF

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_single_page(tmp_path, dtype):
    a = (_rng().random((20, 30)) * 200).astype(dtype)
    p = tmp_path / "single.tif"
    tifffile.imwrite(p, a)
    im = read_image(p)
    assert im.array.shape == (1, 20, 30, 1) and im.array.dtype == dtype
    np.testing.assert_array_equal(im.array[0, ..., 0], a)
    assert im.name == "single" and im.source == str(p)
    assert im.geometry.matches(Geometry.identity())


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_multi_page(tmp_path, dtype):
    a = (_rng().random((4, 20, 30)) * 200).astype(dtype)
    p = tmp_path / "stack.tiff"
    tifffile.imwrite(p, a, photometric="minisblack")
    im = read_image(p)
    assert im.array.shape == (4, 20, 30, 1) and im.array.dtype == dtype
    np.testing.assert_array_equal(im.array[..., 0], a)


def test_tiff_pages_written_one_by_one(tmp_path):
    # Pages without tifffile's shape metadata (as most other software writes them).
    p = tmp_path / "pages.tif"
    with tifffile.TiffWriter(p) as w:
        for i in range(3):
            w.write(np.full((8, 9), i + 1, np.uint16), metadata=None)
    im = read_image(p)
    assert im.array.shape == (3, 8, 9, 1)
    assert list(im.array[:, 0, 0, 0]) == [1, 2, 3]


def test_tiff_pages_of_different_sizes(tmp_path):
    p = tmp_path / "mixed_pages.tif"
    with tifffile.TiffWriter(p) as w:
        w.write(np.zeros((8, 9), np.uint8), metadata=None)
        w.write(np.zeros((4, 9), np.uint8), metadata=None)
    with pytest.raises(ImageReadError, match=r"mixed_pages\.tif.*9x8.*9x4"):
        read_image(p)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tiff_rgb(tmp_path, dtype):
    a = (_rng().random((2, 20, 30, 3)) * 250).astype(dtype)
    p = tmp_path / "rgb.tif"
    tifffile.imwrite(p, a, photometric="rgb")
    im = read_image(p)
    assert im.array.shape == (2, 20, 30, 3) and im.array.dtype == dtype
    np.testing.assert_array_equal(im.array, a)


def test_tiff_imagej_spacing_with_dims(tmp_path):
    a = np.arange(3 * 10 * 12, dtype=np.uint16).reshape(3, 10, 12)
    p = tmp_path / "zstack.tif"
    tifffile.imwrite(p, a, imagej=True, resolution=(1 / 0.5, 1 / 0.25),
                     metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"})
    vol = read_image(p, dims=3)
    stack = read_image(p, dims=2)
    np.testing.assert_array_equal(vol.array, stack.array)
    assert vol.geometry.spacing == pytest.approx((2.0, 0.25, 0.5))
    assert stack.geometry.spacing == pytest.approx((1.0, 0.25, 0.5))


# ---------------------------------------------------------------- PNG / JPEG

def test_png_grey_rgb_rgba_palette(tmp_path):
    rng = _rng()
    grey = (rng.random((20, 30)) * 255).astype(np.uint8)
    rgb = (rng.random((20, 30, 3)) * 255).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "pal.png")

    g = read_image(tmp_path / "grey.png")
    assert g.array.shape == (1, 20, 30, 1) and g.array.dtype == np.uint8
    np.testing.assert_array_equal(g.array[0, ..., 0], grey)
    c = read_image(tmp_path / "rgb.png")
    assert c.array.shape == (1, 20, 30, 3)
    np.testing.assert_array_equal(c.array[0], rgb)
    a = read_image(tmp_path / "rgba.png")
    np.testing.assert_array_equal(a.array[0], rgb)   # alpha dropped, colours untouched
    p = read_image(tmp_path / "pal.png")
    assert p.array.shape == (1, 20, 30, 3) and p.array.dtype == np.uint8


def test_png_16bit_stays_uint16(tmp_path):
    a = (_rng().random((20, 30)) * 60000 + 1000).astype(np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")
    im = read_image(p)
    assert im.array.dtype == np.uint16
    np.testing.assert_array_equal(im.array[0, ..., 0], a)


def test_jpeg(tmp_path):
    yy, xx = np.mgrid[0:32, 0:48]
    rgb = np.stack([yy * 7, xx * 5, (yy + xx) * 3], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.jpeg", quality=95)
    im = read_image(tmp_path / "photo.jpg")
    assert im.array.shape == (1, 32, 48, 3) and im.array.dtype == np.uint8
    assert np.abs(im.array[0].astype(int) - rgb).mean() < 4   # lossy, but the same picture
    assert read_image(tmp_path / "grey.jpeg").array.shape == (1, 32, 48, 1)


# ---------------------------------------------------------------- folders

def test_natural_sort_key():
    names = ["img_10.png", "img_2.png", "IMG_1.png", "img_1b.png"]
    assert sorted(names, key=natural_sort_key) == ["IMG_1.png", "img_1b.png", "img_2.png",
                                                     "img_10.png"]


def test_folder_natural_order(tmp_path):
    for i in (10, 1, 2):
        Image.fromarray(np.full((16, 20), i, np.uint8)).save(tmp_path / f"img_{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"junk")
    assert [p.name for p in list_image_files(tmp_path)] == ["img_1.png", "img_2.png", "img_10.png"]
    im = read_image(tmp_path)
    assert im.array.shape == (3, 16, 20, 1)
    assert list(im.array[:, 0, 0, 0]) == [1, 2, 10]
    assert im.name == tmp_path.name


def test_folder_mixed_sizes(tmp_path):
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(tmp_path / "a_1.png")
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(tmp_path / "a_2.png")
    Image.fromarray(np.zeros((12, 20), np.uint8)).save(tmp_path / "a_3.png")
    with pytest.raises(ImageReadError, match=r"'a_3\.png' is 20x12.*'a_1\.png' is 20x16"):
        read_image(tmp_path)


def test_folder_mixed_channels(tmp_path):
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(tmp_path / "a_1.png")
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(tmp_path / "a_2.png")
    with pytest.raises(ImageReadError, match=r"a_2\.png.*3 channels"):
        read_image(tmp_path)


def test_empty_folder(tmp_path):
    with pytest.raises(ImageReadError, match="no supported images"):
        read_image(tmp_path)


# ---------------------------------------------------------------- 3D formats

@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".nii", ".mha"])
def test_volume_round_trip_via_sitk(tmp_path, suffix):
    a = (_rng().random((5, 12, 14)) * 3000 - 1000).astype(np.int16)
    img = geometry_to_sitk(sitk.GetImageFromArray(a), ROTATED)
    p = tmp_path / f"vol{suffix}"
    sitk.WriteImage(img, str(p))
    im = read_image(p)
    assert im.array.shape == (5, 12, 14, 1) and im.array.dtype == np.int16
    np.testing.assert_array_equal(im.array[..., 0], a)
    assert im.geometry.matches(ROTATED, tol=1e-4), im.geometry
    assert im.geometry.spacing[0] == pytest.approx(6.5)
    assert im.name == "vol"


def test_vector_volume_channels_last(tmp_path):
    a = (_rng().random((3, 8, 9, 2)) * 100).astype(np.float32)
    img = geometry_to_sitk(sitk.GetImageFromArray(a, isVector=True), ROTATED)
    sitk.WriteImage(img, str(tmp_path / "vec.nrrd"))
    im = read_image(tmp_path / "vec.nrrd")
    assert im.array.shape == (3, 8, 9, 2)
    np.testing.assert_array_equal(im.array, a)


def test_2d_nrrd_gives_one_slice(tmp_path):
    a = np.arange(6 * 7, dtype=np.uint16).reshape(6, 7)
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((0.5, 0.25))
    sitk.WriteImage(img, str(tmp_path / "flat.nrrd"))
    im = read_image(tmp_path / "flat.nrrd")
    assert im.array.shape == (1, 6, 7, 1)
    assert im.geometry.spacing == pytest.approx((1.0, 0.25, 0.5))


def test_4d_nifti_becomes_channels(tmp_path):
    a = (_rng().random((2, 3, 8, 9)) * 100).astype(np.float32)   # (modality, z, y, x)
    img4 = sitk.JoinSeries([sitk.GetImageFromArray(m) for m in a])
    assert img4.GetDimension() == 4
    sitk.WriteImage(img4, str(tmp_path / "multi.nii.gz"))
    im = read_image(tmp_path / "multi.nii.gz")
    assert im.array.shape == (3, 8, 9, 2)
    np.testing.assert_array_equal(im.array[..., 1], a[1])


def test_dicom_series_folder(tmp_path):
    vol = (_rng().random((5, 16, 16)) * 1000 - 500).astype(np.int16)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-10.0, 20.0, 30.0))
    direction = img.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.424242"
    common = [("0008|0031", "120000"), ("0008|0021", "20240101"),
              ("0008|0008", "DERIVED\\SECONDARY"),
              ("0020|000e", series_uid), ("0020|000d", series_uid + ".9"), ("0008|0060", "CT"),
              ("0020|0037", "\\".join(str(d) for d in (direction[0], direction[3], direction[6],
                                                        direction[1], direction[4], direction[7]))),
              ("0008|103e", "test series")]
    folder = tmp_path / "dicom"
    folder.mkdir()
    for i in range(vol.shape[0]):
        sl = img[:, :, i]
        for tag, value in common:
            sl.SetMetaData(tag, value)
        position = img.TransformIndexToPhysicalPoint((0, 0, i))
        sl.SetMetaData("0020|0032", "\\".join(map(str, position)))
        sl.SetMetaData("0020|0013", str(i + 1))
        sl.SetMetaData("0028|0030", "0.8\\0.7")
        sl.SetMetaData("0018|0050", "2.5")
        # Written in reverse to prove the reader orders slices by position, not by name.
        writer.SetFileName(str(folder / f"slice{vol.shape[0] - i}.dcm"))
        writer.Execute(sl)
    im = read_image(folder)
    assert im.array.shape == (5, 16, 16, 1)
    np.testing.assert_array_equal(im.array[..., 0], vol)
    assert im.geometry.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert im.geometry.origin == pytest.approx((-10.0, 20.0, 30.0))
    assert im.name == "dicom"


# ---------------------------------------------------------------- errors

def test_unsupported_extension(tmp_path):
    p = tmp_path / "data.xyz"
    p.write_text("hello")
    with pytest.raises(ImageReadError, match=r"data\.xyz.*unsupported file type"):
        read_image(p)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match=r"nothere\.png.*not found"):
        read_image(tmp_path / "nothere.png")


@pytest.mark.parametrize("name", ["broken.png", "broken.nrrd", "broken.tif", "broken.nii.gz",
                                  "broken.jpg"])
def test_corrupt_files(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ImageReadError, match=name.replace(".", r"\.")) as e:
        read_image(p)
    assert "cannot read" in str(e.value)


def test_truncated_nrrd(tmp_path):
    a = (_rng().random((4, 20, 20)) * 1000).astype(np.int16)
    p = tmp_path / "cut.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(a), str(p))   # uncompressed: header + raw bytes
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ImageReadError, match=r"cut\.nrrd"):
        read_image(p)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti(tmp_path, suffix):
    # ITK alone zero-fills a short NIfTI silently; the reader must refuse it instead.
    a = (_rng().random((4, 20, 20)) * 1000 + 1).astype(np.int16)
    p = tmp_path / f"cut{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(a), str(p))
    np.testing.assert_array_equal(read_image(p).array[..., 0], a)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 300])
    with pytest.raises(ImageReadError, match=r"cut\.nii.*truncated"):
        read_image(p)


def test_truncated_png(tmp_path):
    p = tmp_path / "cut.png"
    Image.fromarray((_rng().random((64, 64)) * 255).astype(np.uint8)).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.png"):
        read_image(p)


# ---------------------------------------------------------------- arrays

def test_as_image_data_2d_rules():
    assert as_image_data(np.zeros((20, 30))).array.shape == (1, 20, 30, 1)
    assert as_image_data(np.zeros((20, 30, 3), np.uint8)).array.shape == (1, 20, 30, 3)
    assert as_image_data(np.zeros((20, 30, 1))).array.shape == (1, 20, 30, 1)
    assert as_image_data(np.zeros((5, 20, 30))).array.shape == (5, 20, 30, 1)
    # 3 slices of 2x30: the last axis (30) is not a plausible channel count.
    assert as_image_data(np.zeros((3, 2, 30))).array.shape == (3, 2, 30, 1)
    assert as_image_data(np.zeros((4, 20, 30, 2))).array.shape == (4, 20, 30, 2)
    # The project's channel count settles the ambiguous case.
    assert as_image_data(np.zeros((3, 20, 3)), channels=1).array.shape == (3, 20, 3, 1)
    with pytest.raises(ImageReadError, match=r"'rgb'.*\(20, 30, 3\).*1 channel"):
        as_image_data(np.zeros((20, 30, 3)), channels=1, name="rgb")   # not 20 slices of 30x3
    assert as_image_data(np.zeros((20, 30, 3)), channels=3).array.shape == (1, 20, 30, 3)
    with pytest.raises(ImageReadError, match="'probe'.*3 channels"):
        as_image_data(np.zeros((20, 30, 4)), channels=3, name="probe")


def test_as_image_data_3d_rules_and_spacing():
    im = as_image_data(np.zeros((5, 20, 30), np.int16), spacing=(6.5, 0.8, 0.7), dims=3)
    assert im.array.shape == (5, 20, 30, 1) and im.array.dtype == np.int16
    assert im.geometry.spacing == (6.5, 0.8, 0.7)
    assert as_image_data(np.zeros((5, 20, 30, 2)), dims=3).array.shape == (5, 20, 30, 2)
    # In 3D a (Z, Y, 3) array is still a volume, not RGB.
    assert as_image_data(np.zeros((20, 30, 3)), dims=3).array.shape == (20, 30, 3, 1)
    im2 = as_image_data(np.zeros((20, 30)), spacing=(0.5, 0.25))
    assert im2.geometry.spacing == (1.0, 0.5, 0.25)
    assert as_image_data(np.zeros((4, 4))).geometry.spacing == (1.0, 1.0, 1.0)
    assert as_image_data(np.zeros((4, 4))).array.dtype == np.float32   # float64 -> float32
    with pytest.raises(ImageReadError, match="'s'.*spacing"):
        as_image_data(np.zeros((4, 4)), spacing=(1.0, -1.0), name="s")


@pytest.mark.parametrize("bad,what", [
    (np.zeros(10), "dimensions"), (np.zeros((2, 2, 2, 2, 2)), "dimensions"),
    (np.zeros((0, 10)), "empty"), (np.zeros((4, 4), complex), "pixel type"),
    (np.zeros((4, 4), bool), "pixel type"), (np.array([[object(), 1]]), "pixel type")])
def test_as_image_data_rejects(bad, what):
    with pytest.raises(ImageReadError) as e:
        as_image_data(bad, name="myimg")
    assert "'myimg'" in str(e.value) and what in str(e.value)


def test_check_finite():
    a = np.zeros((2, 5, 6, 1), np.float32)
    check_finite(a, "ok")
    check_finite(np.zeros((3, 3), np.uint16), "ints")
    a[1, 2, 3, 0] = np.nan
    a[1, 4, 0, 0] = np.inf
    with pytest.raises(ImageReadError, match=r"'bad' has 2 NaN/Inf pixels \(first at index "
                                             r"\(1, 2, 3, 0\)\)"):
        check_finite(a, "bad")
    b = np.zeros((3, 3), np.float32)
    b[0, 0], b[0, 1] = np.inf, -np.inf
    with pytest.raises(ImageReadError, match="2 NaN/Inf"):
        check_finite(b, "b")


# ---------------------------------------------------------------- writers

@pytest.mark.parametrize("dtype,channels", [(np.uint8, 1), (np.int16, 1), (np.float32, 1),
                                            (np.uint8, 3), (np.uint16, 2)])
def test_write_image_round_trip(tmp_path, dtype, channels):
    a = (_rng().random((4, 10, 12, channels)) * 200).astype(dtype)
    image = ImageData(a, ROTATED, "x", None)
    p = tmp_path / "sub" / "img.nrrd"
    write_image(p, image)
    back = read_image(p)
    assert back.array.dtype == a.dtype and back.array.shape == a.shape
    np.testing.assert_array_equal(back.array, a)
    assert back.geometry.matches(ROTATED, tol=1e-6)
    assert [f.name for f in p.parent.iterdir()] == ["img.nrrd"]   # no temp file left behind


def test_write_image_single_2d_slice(tmp_path):
    image = as_image_data(np.arange(20, dtype=np.uint8).reshape(4, 5), spacing=(0.5, 0.25))
    write_image(tmp_path / "one.nrrd", image)
    back = read_image(tmp_path / "one.nrrd")
    assert back.array.shape == (1, 4, 5, 1)
    assert back.geometry.matches(image.geometry)


def test_write_image_is_compressed(tmp_path):
    a = np.zeros((8, 64, 64, 1), np.uint16)
    write_image(tmp_path / "z.nrrd", ImageData(a, Geometry.identity(), "z"))
    assert (tmp_path / "z.nrrd").stat().st_size < a.nbytes / 10


def test_labels_nrrd_round_trip(tmp_path):
    lab = _rng().integers(0, 4, (5, 12, 14)).astype(np.uint8)
    write_labels(tmp_path / "lab.nrrd", lab, ROTATED)
    back, geom = read_labels(tmp_path / "lab.nrrd")
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, lab)
    assert geom.matches(ROTATED)


@pytest.mark.parametrize("slices", [1, 3])
def test_labels_tiff_round_trip(tmp_path, slices):
    lab = _rng().integers(0, 6, (slices, 12, 14)).astype(np.uint8)
    write_labels(tmp_path / "lab.tif", lab, Geometry.identity())
    with tifffile.TiffFile(tmp_path / "lab.tif") as tf:
        assert len(tf.pages) == slices and tf.pages[0].dtype == np.uint8
    back, _ = read_labels(tmp_path / "lab.tif")
    np.testing.assert_array_equal(back, lab)


def test_write_labels_rejects_bad_values(tmp_path):
    with pytest.raises(LabelError, match="0..255"):
        write_labels(tmp_path / "l.nrrd", np.full((1, 3, 3), 300, np.int32), Geometry.identity())
    with pytest.raises(LabelError, match="integers"):
        write_labels(tmp_path / "l.nrrd", np.zeros((1, 3, 3), np.float32), Geometry.identity())


def test_read_labels_rejects_non_label_maps(tmp_path):
    frac = np.full((2, 4, 4), 0.5, np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(frac), str(tmp_path / "prob.nrrd"))
    with pytest.raises(LabelError, match=r"prob\.nrrd.*not an integer label map"):
        read_labels(tmp_path / "prob.nrrd")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "colour.png")
    with pytest.raises(LabelError, match=r"colour\.png.*3 channels"):
        read_labels(tmp_path / "colour.png")
    big = np.full((1, 4, 4), 1000, np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(big), str(tmp_path / "big.nrrd"))
    with pytest.raises(LabelError, match=r"big\.nrrd.*0..255"):
        read_labels(tmp_path / "big.nrrd")
    # Whole-number floats are a label map some tools save as float.
    whole = np.array([[[0, 1], [2, 3]]], np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(whole), str(tmp_path / "whole.nii.gz"))
    back, _ = read_labels(tmp_path / "whole.nii.gz")
    assert back.dtype == np.uint8 and back.tolist() == [[[0, 1], [2, 3]]]


def test_write_float_map(tmp_path):
    u = _rng().random((3, 6, 7)).astype(np.float16)
    write_float_map(tmp_path / "entropy.nrrd", u, ROTATED)
    back = read_image(tmp_path / "entropy.nrrd")
    assert back.array.dtype == np.float32 and back.array.shape == (3, 6, 7, 1)
    np.testing.assert_array_equal(back.array[..., 0], u.astype(np.float32))
    assert back.geometry.matches(ROTATED)


# ---------------------------------------------------------------- real data

def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


def test_real_isbi_png():
    im = read_image(_need(DATA / "isbi2012_em_membranes" / "image" / "00.png"))
    assert im.array.shape == (1, 512, 512, 1) and im.array.dtype == np.uint8
    assert im.array.std() > 10


def test_real_pyradiomics_nrrd_spacing_order():
    p = _need(DATA / "pyradiomics_mri_lesions_3d" / "brain1_image.nrrd")
    im = read_image(p)
    assert im.array.shape == (25, 256, 256, 1)
    assert im.geometry.spacing[0] == pytest.approx(6.5, abs=1e-3)
    assert im.geometry.spacing[1:] == pytest.approx((0.78125, 0.78125), abs=1e-4)
    lab, geom = read_labels(_need(DATA / "pyradiomics_mri_lesions_3d" / "brain1_label.nrrd"))
    assert lab.shape == (25, 256, 256) and geom.matches(im.geometry)
    assert lab.max() >= 1


def test_real_hippocampus_nifti():
    folder = _need(DATA / "msd_task04_hippocampus_mri" / "imagesTr")
    p = sorted(folder.glob("*.nii.gz"))[0]
    im = read_image(p)
    ref = sitk.ReadImage(str(p))
    assert im.array.shape[:3] == tuple(reversed(ref.GetSize()))
    assert im.geometry.origin == pytest.approx(ref.GetOrigin())
    assert im.geometry.direction == pytest.approx(ref.GetDirection())
    assert im.name == p.name[: -len(".nii.gz")]
