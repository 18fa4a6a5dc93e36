"""Offline OCR read-back and a character-level agreement score, shared by every job that checks text.

``read_text(image)`` runs one of two engines that need no network:

* ``rapidocr`` (default): PP-OCR detection + recognition ONNX models shipped inside the
  ``rapidocr-onnxruntime`` wheel (installed ``--no-deps``; it needs only onnxruntime, cv2 from
  opencv-python-headless, pyclipper, shapely, six, PyYAML, numpy, Pillow). English and Chinese.
* ``tesseract``: Debian's ``tesseract-ocr`` + ``tesseract-ocr-chi-sim``, called as the ``tesseract``
  CLI in a subprocess (no pytesseract), ``-l eng+chi_sim``, TSV output for boxes and confidences.

Engines load lazily, once per process (a Ray actor or task worker reuses its engine across batches).
``char_agreement(reference, read)`` is 1 − normalised character edit distance after Unicode NFKC,
whitespace and punctuation removal, so it works the same for Chinese (no word segmentation needed)
and ignores the spaces tesseract puts between CJK characters.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import threading
import unicodedata
from dataclasses import dataclass, field

import numpy as np

ENGINES = ("rapidocr", "tesseract")
DEFAULT_ENGINE = "rapidocr"


@dataclass(frozen=True)
class OcrResult:
    """What an engine read: lines in reading order (top to bottom, then left to right)."""

    text: str
    """The lines joined with ``\\n``."""
    lines: list[str] = field(default_factory=list)
    """One string per detected text line."""
    boxes: list[list[tuple[float, float]]] = field(default_factory=list)
    """Per line, its corner points in pixels (clockwise from top-left; 4 points)."""
    scores: list[float] = field(default_factory=list)
    """Per line, the engine's recognition confidence in [0, 1]."""
    engine: str = DEFAULT_ENGINE
    """Which engine read it (``rapidocr`` or ``tesseract``)."""


_LOCK = threading.Lock()
_RAPID: dict[int, object] = {}  # threads -> engine; one per process


def _rapid(threads: int):
    with _LOCK:
        if threads not in _RAPID:
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError as e:  # a missing dependency names the package to install
                raise RuntimeError(f"OCR engine 'rapidocr' is not importable ({e}); install "
                                   "rapidocr-onnxruntime (--no-deps) with pyclipper, shapely, six, "
                                   "or use engine='tesseract'") from None
            # onnxruntime otherwise spreads each call over every core of the machine, which
            # oversubscribes CPUs that Ray already gave to other workers.
            kw = {"intra_op_num_threads": threads, "inter_op_num_threads": 1} if threads > 0 else {}
            # Rendered text is upright (no 180° classifier). Detection runs at the image's own size
            # (capped at 1280 px): the default upscales the short side to 736 px, several times the
            # work for a wide line, with no gain on clean renders.
            _RAPID[threads] = RapidOCR(use_cls=False, det_limit_type="max", det_limit_side_len=1280, **kw)
        return _RAPID[threads]


def _read_rapidocr(image, threads: int) -> OcrResult:
    # RapidOCR takes an ndarray in OpenCV's BGR order.
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    result, _ = _rapid(threads)(bgr, use_cls=False)
    segs = [(str(t), [(float(x), float(y)) for x, y in box], float(s)) for box, t, s in result or []]
    return _merge_lines(segs, "rapidocr")


def _merge_lines(segs: list[tuple[str, list[tuple[float, float]], float]], engine: str) -> OcrResult:
    """Detected segments -> lines: the detector may cut one line at a wide gap, so segments whose
    vertical extents overlap by more than half the smaller height join, left to right."""
    rows: list[list[tuple[str, list[tuple[float, float]], float]]] = []
    for seg in sorted(segs, key=lambda s: min(p[1] for p in s[1])):
        y0, y1 = min(p[1] for p in seg[1]), max(p[1] for p in seg[1])
        for row in rows:
            r0, r1 = min(p[1] for s in row for p in s[1]), max(p[1] for s in row for p in s[1])
            if min(y1, r1) - max(y0, r0) > 0.5 * min(y1 - y0, r1 - r0):
                row.append(seg)
                break
        else:
            rows.append([seg])
    lines, boxes, scores = [], [], []
    for row in rows:
        row.sort(key=lambda s: min(p[0] for p in s[1]))
        pts = [p for s in row for p in s[1]]
        x0, y0 = min(p[0] for p in pts), min(p[1] for p in pts)
        x1, y1 = max(p[0] for p in pts), max(p[1] for p in pts)
        lines.append(_join_words([s[0] for s in row]) if len(row) > 1 else row[0][0])
        boxes.append(row[0][1] if len(row) == 1 else [(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
        weights = [max(1, len(s[0])) for s in row]
        scores.append(float(np.average([s[2] for s in row], weights=weights)))
    return OcrResult("\n".join(lines), lines, boxes, scores, engine)


def _read_tesseract(image, threads: int, langs: str = "eng+chi_sim") -> OcrResult:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    env = dict(os.environ, OMP_THREAD_LIMIT=str(max(1, threads)) if threads > 0 else "1")
    try:
        proc = subprocess.run(["tesseract", "stdin", "stdout", "-l", langs, "--psm", "3", "tsv"],
                              input=buf.getvalue(), capture_output=True, env=env, timeout=120)
    except FileNotFoundError:
        raise RuntimeError("OCR engine 'tesseract' not found on PATH; install Debian's tesseract-ocr "
                           "and tesseract-ocr-chi-sim, or use engine='rapidocr'") from None
    if proc.returncode != 0:
        raise RuntimeError(f"tesseract failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-300:]}")
    # TSV level-5 rows are words; one segment per (block, paragraph, line), then the same merge.
    groups: dict[tuple[int, int, int], list[dict]] = {}
    for row in csv.DictReader(io.StringIO(proc.stdout.decode("utf-8", errors="replace")), delimiter="\t",
                              quoting=csv.QUOTE_NONE):
        if row.get("level") != "5" or not (row.get("text") or "").strip():
            continue
        groups.setdefault((int(row["block_num"]), int(row["par_num"]), int(row["line_num"])), []).append(row)
    segs = []
    for words in groups.values():
        x0 = min(int(w["left"]) for w in words)
        y0 = min(int(w["top"]) for w in words)
        x1 = max(int(w["left"]) + int(w["width"]) for w in words)
        y1 = max(int(w["top"]) + int(w["height"]) for w in words)
        conf = float(np.mean([max(0.0, float(w["conf"])) for w in words])) / 100.0
        segs.append((_join_words([w["text"].strip() for w in words]),
                     [(x0, y0), (x1, y0), (x1, y1), (x0, y1)], conf))
    return _merge_lines(segs, "tesseract")


def _is_cjk(ch: str) -> bool:
    return "\u2e80" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff" or "\uff00" <= ch <= "\uffef"


def _join_words(words: list[str]) -> str:
    """Tesseract splits Chinese into one 'word' per character: join CJK neighbours without a space."""
    out = ""
    for w in words:
        if not w:
            continue
        if out and not (_is_cjk(out[-1]) and _is_cjk(w[0])):
            out += " "
        out += w
    return out


def read_text(image, engine: str = DEFAULT_ENGINE, threads: int = 1) -> OcrResult:
    """Read the text in a ``PIL.Image`` with an offline engine (``rapidocr`` or ``tesseract``).

    ``threads`` caps the engine's CPU threads (0 = the engine's default, all cores); the engine is
    loaded on first use and kept for the life of the process."""
    if engine == "rapidocr":
        return _read_rapidocr(image, threads)
    if engine == "tesseract":
        return _read_tesseract(image, threads)
    raise ValueError(f"unknown OCR engine {engine!r}; choose one of {', '.join(ENGINES)}")


# --------------------------------------------------------------------------- agreement
def normalize_text(s: str, ignore_case: bool = False) -> str:
    """NFKC (full-width forms -> ASCII), then drop whitespace, punctuation and symbols."""
    s = unicodedata.normalize("NFKC", s)
    s = "".join(ch for ch in s if not (ch.isspace() or unicodedata.category(ch)[0] in "PSZC"))
    return s.casefold() if ignore_case else s


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute cost 1) over characters."""
    try:
        from rapidfuzz.distance import Levenshtein
    except ImportError:
        return _edit_distance_np(a, b)
    return int(Levenshtein.distance(a, b))


def _edit_distance_np(a: str, b: str) -> int:
    # Row-by-row DP, vectorised along b except for the insertion chain (a cumulative minimum).
    if not a or not b:
        return max(len(a), len(b))
    bb = np.array([ord(c) for c in b])
    prev = np.arange(len(b) + 1)
    offs = np.arange(len(b) + 1)
    for i, ca in enumerate(a, 1):
        cur = np.empty_like(prev)
        cur[0] = i
        cur[1:] = np.minimum(prev[1:] + 1, prev[:-1] + (bb != ord(ca)))
        prev = np.minimum.accumulate(cur - offs) + offs  # cur[j] = min(cur[j], cur[j-1] + 1)
    return int(prev[-1])


def char_agreement(reference: str, read: str, ignore_case: bool = False) -> float:
    """1 − edit distance / max length of the normalised strings, in [0, 1]; 1.0 when both are empty.

    Order-sensitive: a line read in another order costs edits, which is what a layout check wants."""
    a, b = normalize_text(reference, ignore_case), normalize_text(read, ignore_case)
    n = max(len(a), len(b))
    return 1.0 if n == 0 else 1.0 - edit_distance(a, b) / n
