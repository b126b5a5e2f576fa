"""Box math on small hand-made arrays whose answers were worked out by hand, and NMS against
facenet's own."""
import numpy as np
import pytest

from align import boxes as bx
from align.resample import area_crops, summed_area_table


def test_pyramid_scales_stop_below_12_px():
    # minsize 20: m = 0.6; min side 100 -> 60, 42.54, 30.16, 21.39, 15.16, 10.75 (stop)
    scales = bx.pyramid_scales(100, 150, 20, 0.709)
    assert len(scales) == 5
    assert scales[0] == pytest.approx(0.6)
    assert scales[4] == pytest.approx(0.6 * 0.709 ** 4)
    assert bx.pyramid_scales(19, 500, 20, 0.709) == []        # 19 * 0.6 = 11.4 < 12
    assert bx.level_size(100, 150, 0.6 * 0.709) == (43, 64)   # ceil(42.54), ceil(63.81)


def test_generate_boxes_positions_scores_and_order():
    prob = np.zeros((3, 4), np.float32)
    prob[0, 2] = 0.9
    prob[2, 1] = 0.6      # >= threshold passes
    prob[1, 3] = 0.59
    reg = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4) / 100
    b = bx.generate_boxes(prob, reg, 0.5, 0.6)
    # column-major order: (row 2, col 1) before (row 0, col 2)
    assert b[:, 4].tolist() == pytest.approx([0.6, 0.9])
    # (row 2, col 1) at scale 0.5: x1 = fix((2*1+1)/0.5) = 6, y1 = fix(5/0.5) = 10,
    # x2 = fix((2*1+12)/0.5) = 28, y2 = fix((2*2+12)/0.5) = 32
    assert b[0, :4].tolist() == [6, 10, 28, 32]
    assert b[1, :4].tolist() == [10, 2, 32, 24]
    assert b[0, 5:].tolist() == pytest.approx(reg[2, 1].tolist())


def test_generate_boxes_lone_cell_reads_mirrored_regression():
    prob = np.zeros((2, 5), np.float32)
    prob[1, 1] = 0.8
    reg = np.random.default_rng(0).normal(size=(2, 5, 4)).astype(np.float32)
    facenet = bx.generate_boxes(prob, reg, 1.0, 0.6)
    fixed = bx.generate_boxes(prob, reg, 1.0, 0.6, mirror_lone_cell=False)
    assert facenet[0, 5:].tolist() == pytest.approx(reg[1, 5 - 1 - 1].tolist())   # column 3
    assert fixed[0, 5:].tolist() == pytest.approx(reg[1, 1].tolist())
    assert facenet[0, 4] == pytest.approx(0.8)


def test_nms_union_and_min():
    boxes = np.array([[0, 0, 9, 9, 0.9],      # area 100
                      [1, 0, 10, 9, 0.8],     # overlaps the first: inter 90, union 110 -> 0.818
                      [20, 20, 29, 29, 0.7],
                      [0, 0, 4, 4, 0.95]])    # area 25, inside the first: union 0.25, min 1.0
    assert bx.nms(boxes, 0.5, "union").tolist() == [3, 0, 2]
    # "min": box 3 covers 25/25 of box 0's smaller area and 20/25 of box 1's: both dropped
    assert bx.nms(boxes, 0.7, "min").tolist() == [3, 2]
    assert bx.nms(np.zeros((0, 5)), 0.5).tolist() == []
    with pytest.raises(ValueError):
        bx.nms(boxes, 0.5, "Mean")


def test_pnet_regress_and_bbreg_widths():
    b = np.array([[10, 20, 30, 60, 0.9, 0.1, -0.1, 0.2, 0.0]])
    # P-Net: offsets times x2 - x1 = 20 and y2 - y1 = 40
    assert bx.pnet_regress(b).tolist()[0] == pytest.approx([12, 16, 34, 60, 0.9])
    # bbreg: offsets times the inclusive sizes 21 and 41
    out = bx.bbreg(b[:, :5], np.array([[0.1, -0.1, 0.2, 0.0]]))
    assert out[0].tolist() == pytest.approx([12.1, 15.9, 34.2, 60, 0.9])


def test_rerec_squares_on_centre():
    out = bx.rerec(np.array([[10.0, 20, 30, 60, 0.5]]))
    assert out[0].tolist() == [0, 20, 40, 60, 0.5]


def test_crop_windows_are_facenet_pad_regions():
    # facenet pads x1..x2 (1-based, inclusive): box [1, 1, 4, 4] is pixels 0..3 -> edges [0, 4]
    assert bx.crop_windows(np.array([[1.0, 1, 4, 4], [-2, 5, 3, 9]])).tolist() == \
        [[0, 0, 4, 4], [-3, 4, 3, 9]]


def test_area_crops_average_and_zero_fill():
    img = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    sat = summed_area_table(img)
    assert sat[4, 4, 0] == img.sum()
    # 4x4 -> 2x2: means of 2x2 blocks
    out = area_crops(sat, np.array([[0, 0, 4, 4]]), 2)[..., 0]
    assert out[0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    # window hanging off the top-left by 2 px: the outside counts as zeros
    out = area_crops(sat, np.array([[-2, -2, 2, 2]]), 2)[..., 0]
    assert out[0].tolist() == [[0, 0], [0, 2.5]]
    # upscaling 1 px to 2x2 repeats it; a fractional footprint mixes neighbours
    assert area_crops(sat, np.array([[1, 1, 2, 2]]), 2)[0, ..., 0].tolist() == [[5, 5], [5, 5]]
    assert area_crops(sat, np.array([[0, 0, 3, 1]]), 2)[0, 0, :, 0].tolist() == \
        pytest.approx([(0 + 0.5 * 1) / 1.5, (0.5 * 1 + 2) / 1.5])


def test_nms_keeps_what_facenets_nms_keeps():
    """Against the wheel's own nms (pure numpy) on random boxes with tied scores, empty
    boxes (0/0 overlaps) and more boxes than one block."""
    from facenet_reference import load_detect_face
    facenet_nms = load_detect_face().nms
    rng = np.random.default_rng(0)
    for n in (1, 2, 40, 300, 2 * bx.NMS_BLOCK + 7):
        corner = rng.integers(0, 200, size=(n, 2)).astype(float)
        size = rng.integers(-1, 60, size=(n, 2)).astype(float)     # -1: empty box
        scores = rng.choice(np.linspace(0.6, 1, 9), n)              # many ties
        boxes = np.column_stack([corner, corner + size, scores])
        for threshold, method in ((0.5, "union"), (0.7, "union"), (0.7, "min")):
            with np.errstate(divide="ignore", invalid="ignore"):
                expected = facenet_nms(boxes, threshold, "Min" if method == "min" else "Union")
            assert bx.nms(boxes, threshold, method).tolist() == expected.tolist(), (n, method)
