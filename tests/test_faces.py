"""Face preprocessing: load any image safely (typed errors, bomb guard before decoding), find the face,
crop it to the protocol's 224x224 input."""

from __future__ import annotations

import csv
import io

import cv2
import numpy as np
import pytest
from PIL import Image

import core.faces as faces_module
from core.errors import ImageTooLargeError, InputImageError, InvalidImageError, NoFaceError, TarfasError, WeightsError
from core.faces import CROP_SIZE, Face, crop_square, detect_faces, load_image, prepare_face


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- load_image: formats --------------------------------------------------------------------------
def test_png_round_trip_is_lossless(tmp_path, face_rgb):
    path = _write(tmp_path, "face.png", _encode(Image.fromarray(face_rgb), "PNG"))
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == face_rgb.shape
    assert np.array_equal(out, face_rgb)


def test_str_path_and_bytes_give_the_same_image(tmp_path, face_rgb):
    data = _encode(Image.fromarray(face_rgb), "JPEG", quality=90)
    path = _write(tmp_path, "face.jpg", data)
    from_path = load_image(str(path))
    from_bytes = load_image(data)
    from_bytearray = load_image(bytearray(data))
    assert from_path.shape == (512, 512, 3)
    assert np.array_equal(from_path, from_bytes) and np.array_equal(from_bytes, from_bytearray)
    assert np.abs(from_bytes.astype(int) - face_rgb.astype(int)).mean() < 5  # it is the astronaut


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200  # red-ish
    rgba[:, :10, 3] = 255  # opaque
    rgba[:, 10:20, 3] = 0  # transparent
    rgba[:, 20:, 3] = 128  # half
    out = load_image(_write(tmp_path, "a.png", _encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert tuple(out[5, 5]) == (200, 0, 0)
    assert tuple(out[5, 15]) == (255, 255, 255)
    r, g, b = (int(v) for v in out[5, 25])
    assert 220 <= r <= 235 and 120 <= g <= 135 and g == b  # 50% red over white


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (10, 1))
    out = load_image(_write(tmp_path, "g.png", _encode(Image.fromarray(gray, "L"), "PNG")))
    assert out.shape == (10, 64, 3)
    assert np.array_equal(out[..., 0], gray)
    assert np.array_equal(out[..., 1], gray) and np.array_equal(out[..., 2], gray)


def test_sixteen_bit_grayscale_is_stretched_to_eight_bits(tmp_path):
    values = (1000 + 20 * np.arange(40 * 50, dtype=np.uint16)).reshape(40, 50)  # 1000 .. 40980
    im = Image.fromarray(values)
    assert im.mode == "I;16"
    out = load_image(_write(tmp_path, "d.png", _encode(im, "PNG")))
    assert out.dtype == np.uint8 and out.shape == (40, 50, 3)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255  # full 8-bit range used
    expected = np.round((values - 1000.0) / (values.max() - 1000.0) * 255).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected)
    assert np.array_equal(out[..., 0], out[..., 2])


def test_constant_sixteen_bit_image_is_black_not_nan(tmp_path):
    im = Image.fromarray(np.full((8, 8), 5000, np.uint16))
    out = load_image(_write(tmp_path, "c.png", _encode(im, "PNG")))
    assert out.shape == (8, 8, 3) and not out.any()


def test_palette_png_becomes_rgb(tmp_path):
    im = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    out = load_image(_write(tmp_path, "p.png", _encode(im, "PNG")))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (0, 0, 255)


def test_exif_orientation_is_applied(tmp_path):
    # stored 80 wide x 40 high, a red block in the stored top-left corner
    arr = np.full((40, 80, 3), 255, np.uint8)
    arr[:10, :10] = (255, 0, 0)
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = _encode(im, "JPEG", quality=95, exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).size == (80, 40)  # the file itself is landscape
    out = load_image(_write(tmp_path, "rot.jpg", data))
    assert out.shape == (80, 40, 3)  # shown portrait: height and width swapped
    # rotating clockwise moves the stored top-left corner to the top-right
    top_right, top_left = out[:8, -8:].mean(axis=(0, 1)), out[:8, :8].mean(axis=(0, 1))
    assert top_right[0] > 200 and top_right[1] < 60
    assert top_left.min() > 200


# --- load_image: refusals -------------------------------------------------------------------------
def test_error_classes():
    for cls in (InvalidImageError, ImageTooLargeError, NoFaceError):
        assert issubclass(cls, InputImageError) and issubclass(cls, TarfasError)


def test_a_text_file_is_not_an_image(tmp_path):
    path = _write(tmp_path, "notes.jpg", b"this is not an image, only text that says so\n" * 5)
    with pytest.raises(InvalidImageError) as info:
        load_image(path)
    assert "notes.jpg" in str(info.value)


def test_a_truncated_jpeg_is_refused(tmp_path, face_rgb):
    data = _encode(Image.fromarray(face_rgb), "JPEG", quality=90)
    path = _write(tmp_path, "half.jpg", data[: len(data) // 2])
    with pytest.raises(InvalidImageError) as info:
        load_image(path)
    assert "half.jpg" in str(info.value)
    with pytest.raises(InvalidImageError):
        load_image(data[: len(data) // 2])


def test_a_truncated_png_is_refused(face_rgb):
    data = _encode(Image.fromarray(face_rgb), "PNG")
    with pytest.raises(InvalidImageError):
        load_image(data[: len(data) // 2])


def test_an_empty_file_is_refused(tmp_path):
    path = _write(tmp_path, "empty.png", b"")
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(path)
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(b"")


def test_a_missing_path_is_refused(tmp_path):
    with pytest.raises(InvalidImageError) as info:
        load_image(tmp_path / "nowhere" / "face.png")
    assert "face.png" in str(info.value)


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(InvalidImageError):
        load_image(tmp_path)


def test_too_many_pixels_is_refused_from_the_header_before_decoding():
    data = _encode(Image.new("L", (2000, 2000)), "PNG")
    with pytest.raises(ImageTooLargeError) as info:
        load_image(data, max_pixels=1_000_000)
    assert "2000x2000" in str(info.value)
    # only the header is read: the same file cut to its first bytes is still refused as too large,
    # whereas decoding it would fail as truncated
    header_only = data[:64]
    with pytest.raises(ImageTooLargeError):
        load_image(header_only, max_pixels=1_000_000)
    with pytest.raises(InvalidImageError):
        load_image(header_only, max_pixels=10_000_000)


def test_a_large_image_under_the_cap_loads():
    data = _encode(Image.new("L", (2000, 2000), 7), "PNG")
    out = load_image(data, max_pixels=4_000_000)
    assert out.shape == (2000, 2000, 3) and int(out[0, 0, 0]) == 7


def test_the_default_cap_refuses_a_decompression_bomb():
    # 10000 x 6000 = 60 MP (the default cap is 50 MP) in a few kB of PNG
    data = _encode(Image.new("1", (10000, 6000)), "PNG")
    assert len(data) < 1_000_000
    with pytest.raises(ImageTooLargeError):
        load_image(data)


def test_too_many_bytes_is_refused(tmp_path, face_rgb):
    data = _encode(Image.fromarray(face_rgb), "PNG")
    path = _write(tmp_path, "big.png", data)
    with pytest.raises(ImageTooLargeError):
        load_image(path, max_bytes=len(data) - 1)
    with pytest.raises(ImageTooLargeError):
        load_image(data, max_bytes=1000)
    assert load_image(path, max_bytes=len(data)).shape == (512, 512, 3)


# --- face detection and cropping ------------------------------------------------------------------
def test_prepare_face_finds_the_astronauts_face(face_rgb):
    fc = prepare_face(face_rgb)
    assert fc.face_detected
    assert fc.crop.shape == (CROP_SIZE, CROP_SIZE, 3) and fc.crop.dtype == np.uint8
    x1, y1, x2, y2 = fc.bbox
    assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512
    # the face of the astronaut is in the upper middle of the picture, roughly 100 px wide
    assert 60 <= x2 - x1 <= 200 and 130 <= (x1 + x2) / 2 <= 300 and (y1 + y2) / 2 < 256
    # the square crop box contains the face with a margin
    cx1, cy1, cx2, cy2 = fc.crop_box
    assert cx2 - cx1 == cy2 - cy1
    assert cx1 < x1 and cy1 < y1 and cx2 > x2 and cy2 > y2
    assert fc.source_size == (512, 512)


def test_the_crop_is_the_resized_crop_box(face_rgb):
    fc = prepare_face(face_rgb)
    x1, y1, x2, y2 = fc.crop_box
    assert 0 <= x1 and 0 <= y1 and x2 <= 512 and y2 <= 512  # this face is well inside the image
    expected = cv2.resize(face_rgb[y1:y2, x1:x2], (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_CUBIC)
    assert np.abs(fc.crop.astype(int) - expected.astype(int)).mean() < 2


def test_yunet_gives_five_landmarks_on_the_face(face_rgb):
    (face,) = detect_faces(face_rgb)
    assert isinstance(face, Face) and 0.6 <= face.score <= 1.0
    x1, y1, x2, y2 = face.box
    right_eye, left_eye, nose, mouth_r, mouth_l = face.landmarks
    for x, y in face.landmarks:
        assert x1 <= x <= x2 and y1 <= y <= y2
    assert right_eye[0] < nose[0] < left_eye[0]  # image-left eye, nose, image-right eye
    assert max(right_eye[1], left_eye[1]) < nose[1] < min(mouth_r[1], mouth_l[1])  # eyes above nose above mouth


def test_several_faces_the_largest_is_analysed(face_rgb):
    head = face_rgb[30:210, 130:320]  # the astronaut's head, 190 x 180
    canvas = np.full((400, 700, 3), 200, np.uint8)
    canvas[20:200, 20:210] = head
    small = cv2.resize(head, (95, 90), interpolation=cv2.INTER_AREA)
    canvas[250:340, 500:595] = small
    found = detect_faces(canvas)
    assert len(found) == 2
    assert found[0].area > found[1].area  # largest first
    fc = prepare_face(canvas)
    x1, y1, x2, y2 = fc.bbox
    assert x2 < 260 and y2 < 260  # the big face on the left, not the small one
    assert any("2 faces" in n for n in fc.notes)


def test_a_tight_crop_gets_no_black_margin(crop):
    fc = prepare_face(crop)  # the face fills this picture: the square stays inside it
    x1, y1, x2, y2 = fc.crop_box
    assert 0 <= x1 and 0 <= y1 and x2 <= 224 and y2 <= 224
    assert fc.bbox[0] >= x1 and fc.bbox[1] >= y1 and fc.bbox[2] <= x2 and fc.bbox[3] <= y2


@pytest.mark.parametrize(
    "box, size, expected",
    [
        ((100, 100, 200, 200), (640, 480), (75, 75, 225, 225)),  # room for the whole margin
        ((0, 0, 40, 40), (100, 100), (0, 0, 60, 60)),  # near a corner: shifted inside
        ((10, 5, 90, 95), (100, 100), (0, 0, 100, 100)),  # the face nearly fills the picture: what is left
        ((0, 0, 120, 120), (100, 100), (-10, -10, 110, 110)),  # face larger than the picture: centred
    ],
)
def test_face_square_keeps_the_margin_inside_the_picture(box, size, expected):
    from core.faces import face_square

    sq = face_square(box, size)
    assert sq == expected
    assert sq[2] - sq[0] == sq[3] - sq[1]


def test_the_detector_file_is_checked_by_hash(tmp_path, monkeypatch):
    """A damaged or replaced YuNet file is refused with a clear error, never run."""
    import threading

    bad = tmp_path / "yunet.onnx"
    bad.write_bytes(faces_module.YUNET_PATH.read_bytes()[:-10] + b"0123456789")
    monkeypatch.setattr(faces_module, "YUNET_PATH", bad)
    monkeypatch.setattr(faces_module, "_MODEL_BYTES", None)
    monkeypatch.setattr(faces_module, "_DETECTORS", threading.local())
    with pytest.raises(WeightsError, match="sha256"):
        detect_faces(np.zeros((64, 64, 3), np.uint8))
    monkeypatch.setattr(faces_module, "YUNET_PATH", tmp_path / "missing.onnx")
    with pytest.raises(WeightsError, match="missing"):
        detect_faces(np.zeros((64, 64, 3), np.uint8))


def test_a_tight_face_crop_is_still_detected(crop):
    fc = prepare_face(crop)
    assert fc.face_detected


def test_prepare_face_is_deterministic(face_rgb):
    a, b = prepare_face(face_rgb), prepare_face(face_rgb.copy())
    assert a.bbox == b.bbox and np.array_equal(a.crop, b.crop)


def test_no_face_in_a_flat_gray_image_raises_and_suggests_the_whole_image():
    gray = np.full((300, 400, 3), 128, np.uint8)
    assert detect_faces(gray) == []
    with pytest.raises(NoFaceError) as info:
        prepare_face(gray)
    assert "whole" in str(info.value)


def test_no_face_with_whole_analyses_the_centre_square():
    img = np.full((300, 400, 3), 128, np.uint8)
    img[:, 50:350] = 60  # the centre square is darker than the side bands
    fc = prepare_face(img, on_no_face="whole")
    assert fc.face_detected is False and fc.bbox is None
    assert fc.crop.shape == (CROP_SIZE, CROP_SIZE, 3)
    assert fc.crop_box == (50, 0, 350, 300)
    assert np.all(fc.crop == 60)
    assert fc.notes and "whole" in fc.notes[0]
    assert fc.source_size == (400, 300)


def test_on_no_face_must_be_error_or_whole(face_rgb):
    with pytest.raises(ValueError, match="on_no_face"):
        prepare_face(face_rgb, on_no_face="skip")


def test_crop_square_pads_out_of_image_regions_with_black():
    white = np.full((100, 100, 3), 255, np.uint8)
    crop, box = crop_square(white, (0, 0, 40, 40), margin=0.25)
    assert box == (-10, -10, 50, 50)  # 40 * 1.5 = 60 px square centred on (20, 20)
    assert crop.shape == (CROP_SIZE, CROP_SIZE, 3)
    # 10 of the 60 source pixels on the left and top are outside: ~37 of 224 output pixels
    assert crop[:25, :25].max() < 5 and crop[:25, 100].max() < 5 and crop[100, :25].max() < 5
    assert crop[50:, 50:].min() > 250


def test_crop_square_inside_the_image_is_a_plain_resize(face_rgb):
    crop, box = crop_square(face_rgb, (200, 200, 300, 300), margin=0.0, size=100)
    assert box == (200, 200, 300, 300)
    assert np.array_equal(crop, face_rgb[200:300, 200:300])


def test_crop_square_of_a_wide_box_uses_the_longer_side():
    img = np.zeros((200, 200, 3), np.uint8)
    _, box = crop_square(img, (50, 90, 150, 110), margin=0.0)
    assert box == (50, 50, 150, 150)


# --- the development data (skipped when absent) ---------------------------------------------------
@pytest.mark.data
def test_dev_images_load_and_crop(fasdev):
    with open(fasdev / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["domain"] == "rienheuver"][:6]
    assert rows, "no rienheuver rows in the manifest"
    for row in rows:
        rgb = load_image(fasdev / row["path"])
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        fc = prepare_face(rgb, on_no_face="whole")
        assert fc.crop.shape == (CROP_SIZE, CROP_SIZE, 3)


def test_detection_gives_the_same_boxes_from_concurrent_threads():
    """OpenCV's FaceDetectorYN keeps its input size as state and is not safe to share between threads
    (the app and the annotator detect in worker threads): each thread must get its own, so boxes match
    a sequential run."""
    from concurrent.futures import ThreadPoolExecutor

    import skimage.data

    from core.samples import live_portrait, simulate_print, simulate_replay

    base = skimage.data.astronaut()
    images = [
        base,
        live_portrait(),
        simulate_print(live_portrait()),
        simulate_replay(live_portrait()),
        base[::-1, ::-1].copy(),
        np.ascontiguousarray(base[:, ::-1]),
    ] * 2
    sequential = [detect_faces(im) for im in images]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(detect_faces, images)) == sequential
