"""align/warp.py: the similarity estimate on hand-made points whose answer is known, the
templates, and parity with insightface 2.1's own norm_crop on our detector's landmarks for
real photos (the samples; ../shared/faces/dev when present)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from align import warp
from conftest import SHARED
import insightface_reference as ref

ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]])
# a face-like, not symmetric point set (input pixels)
SRC = np.array([[210.3, 160.8], [262.1, 158.2], [238.0, 190.4], [215.7, 221.9], [259.9, 219.3]])
DEV = SHARED / "faces" / "dev"
DEV_PHOTOS = 16         # the dev photos this test aligns (bench/parity_warp_dev.py does all)


def rotation(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def similarity(scale: float, degrees: float, shift) -> np.ndarray:
    return np.hstack([scale * rotation(degrees), np.reshape(shift, (2, 1))])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


# --- the estimator ----------------------------------------------------------------------------

@pytest.mark.parametrize("scale, degrees, shift", [
    (1.0, 0.0, (0.0, 0.0)),         # identity
    (1.0, 0.0, (5.0, -3.0)),        # translation
    (1.0, 30.0, (0.0, 0.0)),        # rotation about the origin
    (1.0, -90.0, (0.0, 0.0)),
    (1.0, 180.0, (0.0, 0.0)),
    (2.5, 0.0, (0.0, 0.0)),         # scale
    (0.37, 0.0, (0.0, 0.0)),
    (0.7, -100.0, (12.0, 40.0)),    # all three
    (3.2, 17.5, (-250.0, 99.5)),
])
def test_exact_similarity_is_recovered(scale, degrees, shift):
    expected = similarity(scale, degrees, shift)
    got = warp.estimate_similarity(SRC, apply(expected, SRC))
    assert got.shape == (2, 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_rotation_about_a_point_other_than_the_origin():
    centre = np.array([100.0, 50.0])
    dst = (SRC - centre) @ rotation(90).T + centre
    got = warp.estimate_similarity(SRC, dst)
    # x' = -(y - 50) + 100, y' = (x - 100) + 50
    np.testing.assert_allclose(got, [[0, -1, 150], [1, 0, -50]], atol=1e-9)


def test_two_points_and_collinear_points_fix_the_transform():
    two = SRC[:2]
    expected = similarity(1.5, 40, (3, 4))
    np.testing.assert_allclose(warp.estimate_similarity(two, apply(expected, two)), expected, atol=1e-9)
    line = np.array([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0], [5.0, 10.0]])
    np.testing.assert_allclose(warp.estimate_similarity(line, apply(expected, line)), expected, atol=1e-9)


def test_least_squares_with_noise():
    """With noisy points the estimate is the best similarity: any nearby one fits worse."""
    rng = np.random.default_rng(1)
    dst = apply(similarity(0.8, 12, (30, -7)), SRC) + rng.normal(0, 2.0, SRC.shape)
    best = warp.estimate_similarity(SRC, dst)
    residual = lambda m: float(((apply(m, SRC) - dst) ** 2).sum())
    scale, angle = math.hypot(*best[:, 0]), math.degrees(math.atan2(best[1, 0], best[0, 0]))
    for d_scale, d_angle, d_shift in [(0.01, 0, 0), (-0.01, 0, 0), (0, 0.5, 0), (0, -0.5, 0),
                                      (0, 0, 0.3), (0, 0, -0.3)]:
        other = similarity(scale + d_scale, angle + d_angle, best[:, 2] + d_shift)
        assert residual(other) > residual(best)
    # the centroids map onto each other (the least-squares translation)
    np.testing.assert_allclose(apply(best, SRC.mean(0, keepdims=True))[0], dst.mean(0), atol=1e-9)


def test_a_mirror_image_gives_a_rotation_never_a_reflection():
    mirrored = SRC * [-1, 1]
    m = warp.estimate_similarity(SRC, mirrored)
    assert np.linalg.det(m[:, :2]) > 0
    assert np.isfinite(m).all()


@pytest.mark.parametrize("src, dst, words", [
    (np.tile([[120.0, 80.0]], (5, 1)), ARCFACE_DST, "coincide"),        # one point, five times
    (SRC, np.tile([[56.0, 70.0]], (5, 1)), "coincide"),
    (np.tile([[120.0, 80.0]], (5, 1)) + 1e-9, ARCFACE_DST, "coincide"),
    (np.where(np.eye(5, 2, dtype=bool), np.nan, SRC), ARCFACE_DST, "finite"),
    (SRC + [np.inf, 0], ARCFACE_DST, "finite"),
    (SRC[:1], ARCFACE_DST[:1], "N >= 2"),
    (SRC[:4], ARCFACE_DST, "(N, 2)"),
    (SRC.ravel(), ARCFACE_DST.ravel(), "(N, 2)"),
])
def test_degenerate_points_are_a_clear_error(src, dst, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        warp.estimate_similarity(src, dst)


def test_no_nans_reach_an_image():
    image = np.full((200, 300, 3), 128, np.uint8)
    for bad in (np.full((5, 2), np.nan), np.tile([[150.0, 100.0]], (5, 1)), np.zeros((4, 2))):
        with pytest.raises(ValueError):
            warp.warp_face(image, bad)


# --- templates ----------------------------------------------------------------------------------

def test_the_arcface_template_is_insightfaces():
    np.testing.assert_array_equal(np.asarray(warp.TEMPLATES["arcface"].points, np.float32),
                                  ref.face_align().arcface_dst)
    assert warp.TEMPLATES["arcface"].size == (112, 112)


@pytest.mark.parametrize("size, scale, shift", [(112, 1, 0), (224, 2, 0), (448, 4, 0),
                                                (128, 1, 8), (256, 2, 16), (384, 3, 24),
                                                (896, 8, 0),     # both multiples: 112 wins
                                                (160, 160 / 112, 0), (96, 96 / 112, 0)])
def test_arcface_template_for_each_size(size, scale, shift):
    points, out = warp.template_points(size)
    assert out == (size, size) and points.dtype == np.float32
    np.testing.assert_allclose(points, ARCFACE_DST * scale + [shift, 0], rtol=1e-6)


def test_template_sizes_are_insightfaces():
    fa = ref.face_align()
    rng = np.random.default_rng(2)
    for size in ref.SIZES:
        lm = ARCFACE_DST * 3 + rng.normal(0, 4, (5, 2)) + 100
        m_ref, _ = ref.norm_crop(np.zeros((10, 10, 3), np.uint8), lm, size)
        m, out = warp.face_transform(lm, size)
        assert out == (size, size)
        np.testing.assert_array_equal(m, m_ref)
        # the template's own points map onto themselves
        points, _ = warp.template_points(size)
        np.testing.assert_allclose(warp.estimate_similarity(points, points), np.eye(2, 3), atol=1e-6)
    with pytest.raises(AssertionError):         # insightface refuses other sizes; we scale by S/112
        fa.estimate_norm(ARCFACE_DST, 160)


def test_sphereface_is_arcface_eight_pixels_to_the_left(sample_images, detector):
    image = sample_images["grace_hopper.jpg"]
    (lm,) = detector.detect(image).landmarks
    points, out = warp.template_points(112, "sphereface")
    assert out == (96, 112)
    np.testing.assert_allclose(points, ARCFACE_DST - [8, 0], atol=1e-4)
    m_sphere, _ = warp.face_transform(lm, 112, "sphereface")
    m_arc, _ = warp.face_transform(lm, 112, "arcface")
    np.testing.assert_allclose(m_sphere, m_arc - [[0, 0, 8], [0, 0, 0]], atol=1e-4)
    thumb = warp.warp_face(image, lm, 112, "sphereface")
    assert thumb.shape == (112, 96, 3) and thumb.dtype == np.uint8
    most, _ = ref.compare(thumb, warp.warp_face(image, lm, 112, "arcface")[:, 8:104])
    assert most <= 1
    assert warp.warp_face(image, lm, 224, "sphereface").shape == (224, 192, 3)


def test_unknown_template_and_bad_landmarks():
    with pytest.raises(ValueError, match="arcface"):
        warp.template_points(112, "nosuch")
    with pytest.raises(ValueError, match="image_size"):
        warp.template_points(0)
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        warp.face_transform(np.zeros((68, 2)))


def test_footprint_of_a_known_matrix():
    # output (x, y) <- input (2x + 20, 2y + 40): the 112 x 112 output shows input x in
    # [19, 243], y in [39, 263] (outer pixel edges), clipped to a 300 high, 200 wide image
    m = np.array([[0.5, 0, -10], [0, 0.5, -20]])
    assert warp.footprint(m, (112, 112), (300, 200)) == (19, 39, 200, 264)
    assert warp.footprint(m, (112, 112), (1000, 1000)) == (19, 39, 244, 264)
    assert warp.footprint(np.array([[1.0, 0, 500], [0, 1.0, 0]]), (112, 112), (100, 100)) == (0, 0, 0, 100)


# --- parity with insightface on real photos -------------------------------------------------------

def check_parity(image: np.ndarray, landmarks: np.ndarray, stats: dict) -> None:
    """Our matrix and thumbnails (warp_face's, and warp's from our matrix) against
    insightface's for one face, at every size: the thumbnails equal, value for value."""
    for size in ref.SIZES:
        m_ref, thumb_ref = ref.norm_crop(image, landmarks, size)
        m, out = warp.face_transform(landmarks, size)
        s = stats.setdefault(size, {"faces": 0, "matrix": 0.0, "pixel": 0, "differing": 0, "values": 0})
        s["faces"] += 1
        s["matrix"] = max(s["matrix"], float(np.abs(m - m_ref).max()))
        for thumb in (warp.warp_face(image, landmarks, size), warp.warp(image, m, out)):
            most, differing = ref.compare(thumb, thumb_ref)
            s["pixel"] = max(s["pixel"], most)
            s["differing"] += differing
            s["values"] += thumb.size
            assert differing == 0, f"size {size}: {differing} values differ from norm_crop's, by up to {most}"
        assert np.abs(m - m_ref).max() <= 1e-5, (size, m, m_ref)


def report(what: str, stats: dict) -> str:
    return "\n".join(f"{what} S={size}: {s['faces']} faces, matrices max |diff| {s['matrix']:.1e}, "
                     f"pixels max |diff| {s['pixel']}, {s['differing'] / s['values']:.4%} of values differ"
                     for size, s in sorted(stats.items()))


def test_parity_with_insightface_on_the_samples(sample_images, detector):
    stats: dict = {}
    counts = {}
    for name, image in sample_images.items():
        faces = detector.detect(image)
        counts[name] = len(faces)
        for landmarks in faces.landmarks:
            check_parity(image, landmarks, stats)
    assert counts == {"astronaut.png": 1, "grace_hopper.jpg": 1, "t1.jpg": 6}
    print("\n" + report("samples", stats))


def test_parity_with_insightface_on_dev_photos(detector):
    """Every face of the first DEV_PHOTOS dev photos (bench/parity_warp_dev.py runs all)."""
    if not DEV.is_dir():
        pytest.skip(f"{DEV} is not here (../shared beside the checkout)")
    from align.imageio import decode_image
    photos = sorted(p for p in DEV.glob("*/*") if p.is_file() and p.name != "MANIFEST.csv")[:DEV_PHOTOS]
    stats: dict = {}
    for path in photos:
        image = decode_image(path)
        for landmarks in detector.detect(image).landmarks:
            check_parity(image, landmarks, stats)
    assert stats[112]["faces"] >= DEV_PHOTOS // 2
    print("\n" + report(f"dev ({len(photos)} photos)", stats))


def test_public_names():
    import align
    assert align.warp_face is warp.warp_face
    assert align.estimate_similarity is warp.estimate_similarity
    assert {"warp_face", "estimate_similarity"} <= set(align.__all__)


def test_the_aligner_skips_a_face_whose_landmarks_coincide(sample_images, detector, tmp_path):
    """Landmarks that fix no transform write nothing for that face (never a NaN warp); the
    other faces of the photo are written as usual."""
    from align.aligner import Aligner
    from align.config import Config
    from align.dataset import Task
    from align.detect import Faces
    image = sample_images["t1.jpg"]
    found = detector.detect(image)
    landmarks = found.landmarks.copy()
    landmarks[1] = landmarks[1].mean(axis=0)            # face 1: five times the same point
    faces = Faces(found.boxes, found.scores, landmarks)
    (tmp_path / "Group").mkdir()
    aligner = Aligner(Config(align="arcface", detect_multiple_faces=True), tmp_path, tmp_path, detector)
    with aligner.writer.shard("t1") as sink:
        record = aligner._aligned(Task("Group/t1.jpg", "Group/t1"), image, faces, sink)
    assert record["status"] == "aligned"
    assert [w["face"] for w in record["written"]] == [0, 2, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "Group").iterdir()) == ["t1_0.png", "t1_2.png", "t1_3.png",
                                                                      "t1_4.png", "t1_5.png"]
    one = Faces(found.boxes[1:2], found.scores[1:2], landmarks[1:2])
    with aligner.writer.shard("t1") as sink:
        record = aligner._aligned(Task("Group/t1.jpg", "Group/t1"), image, one, sink)
    assert (record["status"], record["written"]) == ("no_face", [])
    assert "landmarks" in record["reason"]
