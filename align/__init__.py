"""align-dataset: facenet's MTCNN face alignment on TensorFlow 2."""
from align.detect import DetectParams, Detector, Faces, detect_faces, detect_faces_batch

__all__ = ["DetectParams", "Detector", "Faces", "detect_faces", "detect_faces_batch"]
