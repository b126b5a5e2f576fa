"""align-dataset: facenet's MTCNN face alignment on TensorFlow 2.

    from align import detect_faces, detect_faces_batch   # the detector
    from align import align_dataset                      # the whole job, as the CLI runs it
    from align import warp_face, estimate_similarity     # 5-point (ArcFace) alignment

Names load on first use, so `import align.config` does not import TensorFlow.
"""
import importlib

_EXPORTS = {
    "DetectParams": "align.config", "Config": "align.config",
    "Detector": "align.detect", "Faces": "align.detect",
    "detect_faces": "align.detect", "detect_faces_batch": "align.detect",
    "align_dataset": "align.runner",
    "warp_face": "align.warp", "estimate_similarity": "align.warp",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'align' has no attribute {name!r}")
