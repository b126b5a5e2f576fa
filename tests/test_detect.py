"""The cascade against facenet's own detect_face on real photos, and the detector's API."""
import json

import numpy as np
import pytest

from conftest import SHARED, decode

NAMES = ["astronaut.png", "grace_hopper.jpg", "t1.jpg"]
# Parity with facenet's detect_face, as measured on the dev set (204 photos, 184 with faces):
# boxes within 7.7e-5 px, landmarks 1.2e-4 px, scores 1.7e-6 (the pyramid is OpenCV's, as
# facenet's). The bars leave room only for float rounding, which moves facenet's own boxes by
# up to 6e-5 px between an Intel and an AMD CPU.
PIXELS = 1e-3       # boxes and landmarks, input pixels
SCORE = 1e-5        # face probabilities


@pytest.mark.parametrize("name", NAMES)
def test_same_faces_as_facenet(detector, sample_images, reference_faces, name):
    ours = detector.detect(sample_images[name])
    ref = reference_faces[name]
    assert len(ours) == len(ref["boxes"]) > 0
    np.testing.assert_allclose(ours.boxes, ref["boxes"][:, :4], atol=PIXELS, rtol=0)
    np.testing.assert_allclose(ours.landmarks, ref["landmarks"], atol=PIXELS, rtol=0)
    np.testing.assert_allclose(ours.scores, ref["boxes"][:, 4], atol=SCORE, rtol=0)


def test_group_photo_has_six_faces(detector, sample_images):
    faces = detector.detect(sample_images["t1.jpg"])
    assert len(faces) == 6
    assert faces.boxes.shape == (6, 4) and faces.landmarks.shape == (6, 5, 2)
    # landmarks lie inside their boxes, eyes above the mouth
    x, y = faces.landmarks[..., 0], faces.landmarks[..., 1]
    assert ((x >= faces.boxes[:, :1] - 2) & (x <= faces.boxes[:, 2:3] + 2)).all()
    assert (y[:, :2].max(axis=1) < y[:, 3:].min(axis=1)).all()


def test_batch_equals_each_image_alone(detector, sample_images):
    images = [sample_images[n] for n in NAMES]
    # the same photo twice at one size batches P-Net across images; a crop gives another size
    images += [sample_images["t1.jpg"], sample_images["astronaut.png"][50:400, 60:420]]
    batch = detector.detect_batch(images)
    for image, got in zip(images, batch):
        alone = detector.detect(image)
        assert np.array_equal(got.boxes, alone.boxes)
        assert np.array_equal(got.scores, alone.scores)
        assert np.array_equal(got.landmarks, alone.landmarks)


def test_no_retracing_per_image_size(detector, sample_images):
    img = sample_images["astronaut.png"]
    for h, w in [(100, 120), (233, 97), (512, 512), (64, 300)]:
        detector.detect(np.ascontiguousarray(img[:h, :w]))
    assert all(n <= 1 for n in detector.trace_counts().values()), detector.trace_counts()


def test_public_api_and_input_forms(sample_images):
    from align import detect_faces, detect_faces_batch
    rgb = sample_images["grace_hopper.jpg"]
    faces = detect_faces(rgb)
    assert faces.boxes.dtype == np.float64 and faces.boxes.shape == (1, 4)
    assert faces.scores.shape == (1,) and faces.landmarks.shape == (1, 5, 2)
    gray = rgb.mean(axis=2).astype(np.uint8)
    assert np.array_equal(detect_faces(gray).boxes, detect_faces(np.dstack([gray] * 3)).boxes)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    assert np.array_equal(detect_faces(rgba).boxes, faces.boxes)
    # minsize 600: 512 * 12 / 600 < 12 px, so the pyramid has no level at all
    assert len(detect_faces(rgb, minsize=600)) == 0
    assert len(detect_faces(rgb, thresholds=(0.6, 0.7, 0.99999999))) == 0
    assert [len(f) for f in detect_faces_batch([rgb, np.zeros((40, 40, 3), np.uint8)])] == [1, 0]


@pytest.mark.parametrize("bad, message", [
    (np.zeros((10, 10, 3), np.float32), "uint8"),
    (np.zeros((10, 10, 2), np.uint8), "shape"),
    (np.zeros((10,), np.uint8), "shape"),
    (np.zeros((0, 10, 3), np.uint8), "empty"),
])
def test_bad_input_raises_value_error(bad, message):
    from align import detect_faces
    with pytest.raises(ValueError, match=message):
        detect_faces(bad)


def test_tiny_image_has_no_faces(detector):
    assert len(detector.detect(np.full((1, 1, 3), 200, np.uint8))) == 0
    assert len(detector.detect(np.full((11, 500, 3), 200, np.uint8))) == 0


@pytest.mark.skipif(not (SHARED / "reference" / "facenet_dev.jsonl").exists(),
                    reason="needs ../shared/faces/dev and its facenet reference")
def test_dev_set_parity(detector):
    rows = [json.loads(l) for l in (SHARED / "reference" / "facenet_dev.jsonl").read_text().splitlines()]
    mismatched, worst = [], {"box": 0.0, "landmark": 0.0, "score": 0.0}
    faces_compared = 0
    for row in rows:
        faces = detector.detect(decode(SHARED / "faces" / "dev" / row["path"]))
        ref = np.asarray(row["boxes"], dtype=np.float64).reshape(-1, 5)
        marks = np.asarray(row["landmarks"], dtype=np.float64).reshape(-1, 10)
        if len(faces) != len(ref):
            mismatched.append(f"{row['path']}: {len(faces)} faces, facenet {len(ref)}")
            continue
        faces_compared += len(ref)
        if len(ref):
            worst["box"] = max(worst["box"], np.abs(faces.boxes - ref[:, :4]).max())
            worst["landmark"] = max(worst["landmark"], np.abs(
                faces.landmarks - np.stack([marks[:, :5], marks[:, 5:]], -1)).max())
            worst["score"] = max(worst["score"], np.abs(faces.scores - ref[:, 4]).max())
    print(f"dev parity: {len(rows)} images, {faces_compared} faces; max |diff|: box {worst['box']:.1e} px, "
          f"landmark {worst['landmark']:.1e} px, score {worst['score']:.1e}; count mismatches {mismatched}")
    assert len(rows) == 204 and faces_compared > 200
    assert mismatched == []
    assert worst["box"] <= PIXELS and worst["landmark"] <= PIXELS and worst["score"] <= SCORE, worst
