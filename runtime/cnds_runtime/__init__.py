"""Torch-free deployment runtime for cnds ONNX exports (onnxruntime + numpy + Pillow only).

A model exported by ``cnds-compile SPEC --emit onnx`` carries its preprocessing and class names in its
metadata, so it needs nothing else::

    from cnds_runtime import Classifier, FeatureExtractor

    clf = Classifier("model.onnx")
    best = clf.predict(["cat.jpg"], top_k=5)[0]
    fx = FeatureExtractor("fc7.onnx", layer="fc7")
    feats = fx(["cat.jpg", "dog.jpg"])      # (2, 4096) float32

Extraction to files at scale (what ``cnds-extract`` runs): :func:`cnds_runtime.extract.extract_local`
(a parallel loader pipeline, ``.npy``/``.npz``/``.parquet`` written in resumable shards) and
:func:`cnds_runtime.extract.extract_ray` (Ray Data actors, one onnxruntime session each). pyarrow and Ray
are imported only when Parquet is written or the Ray engine is used.

This package never imports torch or ``cnds_compiler``.
"""

__version__ = "0.1.0"

from .errors import ImageError, ModelError, RuntimeCndsError  # noqa: E402
from .metadata import ModelMetadata, OutputInfo  # noqa: E402
from .model import Batch, Classifier, CndsModel, FeatureExtractor, Prediction, load  # noqa: E402
from .preprocess import Preprocessor  # noqa: E402

__all__ = [
    "Batch", "Classifier", "CndsModel", "FeatureExtractor", "ImageError", "ModelError", "ModelMetadata",
    "OutputInfo", "Prediction", "Preprocessor", "RuntimeCndsError", "load", "__version__",
]
