"""Stage-3 synthetic text renders (Qwen-Image-2.0 §2.3): the data that teaches text rendering.

English, Chinese and mixed text (words, sentences, paragraphs, poster and slide blocks) is drawn with
installed fonts (Debian ``fonts-noto-cjk``; DejaVu for Latin-only renders) on plain, gradient and
photo backgrounds in four templates (single line, paragraph, poster, slide). Each render keeps its
exact text, per-line boxes, and a ground-truth caption in the captioning *text* schema's JSON shape
(validated against ``captioning/schemas/v1/text.json``). Every render is read back with an offline
OCR engine (:mod:`common.ocr`); its character agreement with the exact text is stored as
``ocr_score``, and the decision pass rejects renders below ``thresholds.min_ocr_score``.

Everything a render depends on is drawn from ``numpy.random.default_rng([seed, index])``, so a seed
fixes the table: a rerun, or a resumed run, renders the same pixels for the same id.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from common.figures import fig_png
from common.typed_config import ConfigError, build, read_yaml, set_dotted

from .synthetic_schema import (
    BACKGROUNDS,
    LANGUAGES,
    REJECT_OCR,
    REJECT_RENDER,
    RENDER_SCHEMA,
    SOURCE,
    TEMPLATES,
)

ROOT = Path(__file__).resolve().parents[1]
TEXT_SCHEMA_PATH = ROOT / "captioning" / "schemas" / "v1" / "text.json"
NOTO, DEJAVU = "/usr/share/fonts/opentype/noto", "/usr/share/fonts/truetype/dejavu"


# --------------------------------------------------------------------------- config
@dataclass(frozen=True, kw_only=True)
class FontSpec:
    regular: str
    """Font file for body text; ``path#index`` picks a face of a ``.ttc`` collection."""
    bold: str
    """Font file for titles."""
    cjk: bool = True
    """The font covers Chinese; ``false`` fonts are used for English-only renders."""


def _default_fonts() -> dict[str, FontSpec]:
    # Face 2 of the Noto CJK collections is the Simplified Chinese (SC) one.
    return {
        "noto-sans-sc": FontSpec(regular=f"{NOTO}/NotoSansCJK-Regular.ttc#2", bold=f"{NOTO}/NotoSansCJK-Bold.ttc#2"),
        "noto-serif-sc": FontSpec(regular=f"{NOTO}/NotoSerifCJK-Regular.ttc#2", bold=f"{NOTO}/NotoSerifCJK-Bold.ttc#2"),
        "dejavu-sans": FontSpec(regular=f"{DEJAVU}/DejaVuSans.ttf", bold=f"{DEJAVU}/DejaVuSans-Bold.ttf", cjk=False),
        "dejavu-serif": FontSpec(regular=f"{DEJAVU}/DejaVuSerif.ttf", bold=f"{DEJAVU}/DejaVuSerif-Bold.ttf", cjk=False),
    }


@dataclass(frozen=True, kw_only=True)
class OcrSettings:
    engine: str = "rapidocr"
    """Read-back engine: ``rapidocr`` (PP-OCR models in its wheel), ``tesseract`` (Debian CLI,
    eng+chi_sim) or ``none`` (no read-back: ``ocr_score`` null, nothing rejected for it)."""
    ignore_case: bool = False
    """Compare case-insensitively (a looser check for small Latin text)."""


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    min_ocr_score: float = 0.85
    """Reject renders whose OCR read-back agrees with the exact text below this (0..1)."""


@dataclass(frozen=True, kw_only=True)
class SyntheticTextConfig:
    seed: int = 0
    """Generator seed; ``--seed`` overrides it. (seed, index) fixes each render."""
    sizes: dict[str, float] = field(default_factory=lambda: {"512x512": 0.5, "768x512": 0.25, "512x768": 0.25})
    """Image sizes ``WxH`` -> sampling weight (stage 3 trains at 512p)."""
    templates: dict[str, float] = field(default_factory=lambda: {"line": 0.3, "paragraph": 0.2, "poster": 0.25,
                                                                 "slide": 0.25})
    """Template -> weight: line | paragraph | poster | slide."""
    languages: dict[str, float] = field(default_factory=lambda: {"en": 0.4, "zh": 0.4, "mixed": 0.2})
    """Language -> weight: en | zh | mixed."""
    backgrounds: dict[str, float] = field(default_factory=lambda: {"plain": 0.3, "gradient": 0.3, "photo": 0.4})
    """Background -> weight: plain | gradient | photo (photos: ``--backgrounds`` table, else the
    photos shipped in scikit-image / scikit-learn)."""
    fonts: dict[str, FontSpec] = field(default_factory=_default_fonts)
    """Font name -> files. A missing file stops the job at load, naming the field."""
    min_font_px: int = 16
    """Smallest text size a layout may shrink to (OCR and the VAE both lose smaller text)."""
    photo_panel_prob: float = 0.5
    """On photos, the chance text sits on a translucent panel (else it gets a contrasting outline)."""
    max_background_rows: int = 10_000
    """At most this many kept rows of a ``--backgrounds`` table are used (the first by id)."""
    store_format: str = "png"
    """Stored image format: ``png`` (lossless text edges) or ``jpeg``."""
    store_quality: int = 95
    """JPEG quality with ``store_format: jpeg``."""
    batch_size: int = 16
    """Renders per Ray Data batch = one Lance fragment."""
    cpus_per_worker: float = 1.0
    """CPUs per render task (also the OCR engine's thread count)."""
    ocr: OcrSettings = field(default_factory=OcrSettings)
    thresholds: Thresholds = field(default_factory=Thresholds)

    def render_hash(self, backgrounds: str | None) -> str:
        """Everything that decides the rows' content except the seed/index: a resumed run must match."""
        d = dataclasses.asdict(self)
        for k in ("thresholds", "batch_size", "cpus_per_worker", "seed"):
            d.pop(k)
        d["backgrounds_table"] = backgrounds
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def threshold_hash(self) -> str:
        return hashlib.sha1(json.dumps(dataclasses.asdict(self.thresholds), sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | None = None, overrides: dict | None = None) -> SyntheticTextConfig:
    """YAML (optional) + dotted overrides -> a checked config; errors name the dotted field."""
    data = read_yaml(path) if path else {}
    for k, v in (overrides or {}).items():
        set_dotted(data, k, v)
    cfg = build(SyntheticTextConfig, data)
    check(cfg)
    return cfg


def parse_size(s: str) -> tuple[int, int]:
    w, _, h = s.lower().partition("x")
    return int(w), int(h)


def check(cfg: SyntheticTextConfig) -> None:
    for name, allowed in (("templates", TEMPLATES), ("languages", LANGUAGES), ("backgrounds", BACKGROUNDS)):
        weights = getattr(cfg, name)
        for k, w in weights.items():
            if k not in allowed:
                raise ConfigError(f"{name}.{k}: unknown {name[:-1]} (choose from {', '.join(allowed)})")
            if w < 0:
                raise ConfigError(f"{name}.{k}: weight must be >= 0, got {w}")
        if not weights or sum(weights.values()) <= 0:
            raise ConfigError(f"{name}: needs at least one positive weight")
    for s, w in cfg.sizes.items():
        try:
            wd, ht = parse_size(s)
        except ValueError:
            raise ConfigError(f"sizes.{s}: expected WIDTHxHEIGHT, e.g. 512x512") from None
        if not (128 <= wd <= 4096 and 128 <= ht <= 4096) or w < 0:
            raise ConfigError(f"sizes.{s}: sides must be 128..4096 px and the weight >= 0")
    if not any(f.cjk for f in cfg.fonts.values()):
        raise ConfigError("fonts: at least one font must cover Chinese (cjk: true)")
    for name, spec in cfg.fonts.items():
        for attr in ("regular", "bold"):
            path, index = _font_file(getattr(spec, attr))
            if not os.path.isfile(path):
                raise ConfigError(f"fonts.{name}.{attr}: no such font file: {path} "
                                  "(Debian: apt-get install fonts-noto-cjk fonts-dejavu-core)")
            try:
                ImageFont.truetype(path, 12, index=index)
            except OSError as e:
                raise ConfigError(f"fonts.{name}.{attr}: cannot load {path}#{index}: {e}") from None
    if cfg.ocr.engine not in ("rapidocr", "tesseract", "none"):
        raise ConfigError(f"ocr.engine: expected rapidocr, tesseract or none, got {cfg.ocr.engine!r}")
    if not 0.0 <= cfg.thresholds.min_ocr_score <= 1.0:
        raise ConfigError(f"thresholds.min_ocr_score: must be in [0, 1], got {cfg.thresholds.min_ocr_score}")
    if cfg.store_format not in ("png", "jpeg"):
        raise ConfigError(f"store_format: expected png or jpeg, got {cfg.store_format!r}")
    for name in ("batch_size", "min_font_px", "max_background_rows"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}: must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.photo_panel_prob <= 1.0:
        raise ConfigError(f"photo_panel_prob: must be in [0, 1], got {cfg.photo_panel_prob}")


def _font_file(spec: str) -> tuple[str, int]:
    path, _, index = spec.partition("#")
    return path, int(index or 0)


@functools.lru_cache(maxsize=512)
def _font(spec: str, size: int) -> ImageFont.FreeTypeFont:
    path, index = _font_file(spec)
    return ImageFont.truetype(path, size, index=index)


# --------------------------------------------------------------------------- text
# A small built-in lexicon with sentence frames: combinatorially many distinct texts without a
# download. Real corpora can replace it by passing other lists to TextMaker.
EN = {
    "noun": "river garden market library festival mountain harbor museum bakery station village forest "
            "concert bridge island school studio theater coffee lantern orchard meadow gallery kitchen "
            "planet robot camera bicycle window ocean desert castle temple street tower".split(),
    "adj": "quiet bright ancient modern golden gentle busy silent vivid little grand hidden northern "
           "rainy sunny friendly famous wild peaceful colorful".split(),
    "verb": "opens shines waits grows sings glows rests turns wakes travels".split(),
    "place": "by the sea|under the stars|in the old town|near the station|across the valley|"
             "behind the hills|at the corner|along the river".split("|"),
    "action": "Discover|Explore|Visit|Celebrate|Join|Enjoy|Design|Build|Learn|Share".split("|"),
    "month": "January February March April May June July August September October November December".split(),
}
ZH = {
    "noun": "河流 花园 市场 图书馆 音乐节 山峰 港口 博物馆 面包店 车站 村庄 森林 音乐会 大桥 小岛 学校 工作室 "
            "剧院 咖啡 灯笼 果园 草原 画廊 厨房 星空 机器人 相机 自行车 窗户 海洋 沙漠 城堡 寺庙 街道 高塔 "
            "数据 模型 城市 文化 艺术 科技 未来 春天 夏天 秋天 冬天 茶馆 书店".split(),
    "adj": "安静的 明亮的 古老的 现代的 金色的 温柔的 热闹的 神秘的 美丽的 小小的 宏伟的 隐藏的 北方的 "
           "多彩的 和平的 新鲜的 温暖的 精彩的".split(),
    "verb": "欢迎 参观 探索 庆祝 加入 享受 设计 建设 学习 分享 发现 支持".split(),
    "stem": "美好 热闹 安静 明亮 温暖 有趣 重要 丰富".split(),
}
EN_FRAMES = ["The {adj} {noun} {verb} {place}.", "{action} the {adj} {noun} {place}.",
             "A {adj} {noun} and a {noun2} {place}.", "Every {noun} {verb} when the {noun2} is {adj}.",
             "We met at the {adj} {noun} {place}.", "Tickets for the {noun} start at ${price}."]
ZH_FRAMES = ["{adj}{noun}{place}。", "欢迎来到{adj}{noun}。", "我们在{noun}里{verb}{noun2}。",
             "{noun}让{noun2}变得更加{stem}。", "这是一个关于{noun}和{noun2}的故事。",
             "{year}年{month}月{day}日，{noun}正式开放。", "门票价格为{price}元。"]
ZH_PLACES = "在海边 在星空下 在老城里 在车站旁 在山谷中 在河边".split()


class TextMaker:
    """Words, sentences, paragraphs, poster and slide blocks in en / zh / mixed, from one rng."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def _fill(self, lang: str) -> dict:
        lex, r = (EN if lang == "en" else ZH), self.rng
        d = {k: self.pick(v) for k, v in lex.items()}
        d["noun2"] = self.pick(lex["noun"])
        d.update(year=int(r.integers(1990, 2031)), day=int(r.integers(1, 29)), price=f"{r.integers(5, 500)}")
        if lang == "zh":
            d.update(place=self.pick(ZH_PLACES), month=int(r.integers(1, 13)))
        return d

    def lang_of(self, language: str) -> str:
        return self.pick(("en", "zh")) if language == "mixed" else language

    def words(self, language: str) -> str:
        lang = self.lang_of(language)
        k = int(self.rng.integers(1, 4))
        if lang == "en":
            return " ".join(self.pick(EN["adj"] + EN["noun"]).capitalize() for _ in range(k))
        return "".join(self.pick(ZH["noun"]) for _ in range(k))

    def sentence(self, language: str) -> str:
        lang = self.lang_of(language)
        s = self.pick(EN_FRAMES if lang == "en" else ZH_FRAMES).format(**self._fill(lang))
        return s[0].upper() + s[1:]

    def paragraph(self, language: str, k: int) -> str:
        parts = [self.sentence(language) for _ in range(k)]
        if language == "mixed":  # both languages in one paragraph, however the coin fell
            parts[0], parts[-1] = self.sentence("en"), self.sentence("zh")
        return " ".join(parts)

    def title(self, language: str) -> str:
        lang = self.lang_of(language)
        d = self._fill(lang)
        if lang == "en":
            return self.pick(["{action} the {noun}", "The {adj} {noun}", "{noun} festival {year}",
                              "{adj} {noun} week"]).format(**d).title()
        return self.pick(["{noun}节", "{adj}{noun}", "{year}{noun}展览", "{verb}{noun}"]).format(**d)

    def subtitle(self, language: str) -> str:
        lang = self.lang_of(language)
        d = self._fill(lang)
        if lang == "en":
            return f"{d['month']} {d['day']}, {d['year']} · {d['place'].capitalize()}"
        return f"{d['year']}年{d['month']}月{d['day']}日 · {d['place']}"

    def bullet(self, language: str) -> str:
        lang = self.lang_of(language)
        d = self._fill(lang)
        if lang == "en":
            return self.pick(["{action} the {noun} {place}", "{adj} {noun} up {day}%",
                              "{action} a {adj} {noun2}"]).format(**d).capitalize()
        return self.pick(["{verb}{adj}{noun}", "{noun}增长{day}%", "提升{noun}和{noun2}的质量"]).format(**d)


# --------------------------------------------------------------------------- backgrounds
def _luma(c) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _color(rng, light: bool) -> tuple[int, int, int]:
    lo, hi = (170, 256) if light else (0, 90)
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def plain(rng, w: int, h: int):
    light = bool(rng.random() < 0.6)
    return Image.new("RGB", (w, h), _color(rng, light)), light


def gradient(rng, w: int, h: int):
    light = bool(rng.random() < 0.6)
    a, b = np.array(_color(rng, light), np.float32), np.array(_color(rng, light), np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    # A linear ramp is smooth: compute it on a 1/8 grid and let a bilinear resize fill in.
    gw, gh = max(2, w // 8), max(2, h // 8)
    t = np.add.outer(np.arange(gh, dtype=np.float32) * np.sin(theta), np.arange(gw, dtype=np.float32) * np.cos(theta))
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    small = Image.fromarray((a + (b - a) * t[..., None]).round().astype(np.uint8))
    return small.resize((w, h), Image.Resampling.BILINEAR), light


def photo_crop(rng, im: Image.Image, w: int, h: int) -> Image.Image:
    """A random crop with the target aspect, at least half the photo's extent, resized to w x h."""
    W, H = im.size
    scale = rng.uniform(0.5, 1.0)
    cw = min(W, int(round(min(W, H * w / h) * scale)))
    ch = min(H, int(round(cw * h / w)))
    x, y = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
    return im.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC)


class PhotoPool:
    """Background photos: the kept rows of a curated table (``--backgrounds``) or the sample photos
    shipped in scikit-image / scikit-learn. Decoded lazily per worker process; the last ``CACHE``
    decoded table photos are kept."""

    CACHE = 64

    def __init__(self, table: str | None, version: int | None, row_ids: list[int], ids: list[str],
                 rotate: list[int], storage_options: dict | None = None):
        self.table, self.version, self.row_ids, self.ids, self.rotate = table, version, row_ids, ids, rotate
        self.storage_options = storage_options
        self._cache: dict[int, Image.Image] = {}
        self._samples: list[tuple[str, Image.Image]] | None = None

    @classmethod
    def from_table(cls, uri: str, limit: int, storage_options: dict | None = None) -> PhotoPool:
        from .table import read_kept

        try:
            t, version = read_kept(uri, ["id", "rotate"], storage_options=storage_options)
        except Exception as e:  # noqa: BLE001 - any unreadable table is a bad flag
            raise ConfigError(f"--backgrounds: cannot read kept rows of {uri}: {e}") from None
        t = t.sort_by("id").slice(0, limit)
        if t.num_rows == 0:
            raise ConfigError(f"--backgrounds: {uri} has no kept rows")
        return cls(uri, version, t["_rowid"].to_pylist(), t["id"].to_pylist(),
                   [int(r or 0) for r in t["rotate"].to_pylist()], storage_options)

    def __len__(self) -> int:
        return len(self.ids) if self.table else len(self._sample_photos())

    def _sample_photos(self):
        if self._samples is None:
            from .samples import real_photos

            self._samples = real_photos()
        return self._samples

    def get(self, i: int) -> tuple[Image.Image, str]:
        if not self.table:
            name, im = self._sample_photos()[i]
            return im, f"samples:{name}"
        if i not in self._cache:
            import lance

            from .table import load_image, read_images

            ds = lance.dataset(self.table, version=self.version, storage_options=self.storage_options)
            (data,) = read_images(ds, [self.row_ids[i]])
            if len(self._cache) >= self.CACHE:  # bounded: a pool of 10k photos must not all stay decoded
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = load_image(data, self.rotate[i], short_side=1024)
        return self._cache[i], f"{self.table}#{self.ids[i]}"


# --------------------------------------------------------------------------- layout + drawing
@dataclass
class Block:
    role: str  # caption-schema role: title | heading | body | label
    text: str
    font: str  # font file spec
    size: int
    lines: list[str] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)


def _units(text: str) -> list[str]:
    """Wrap units: Latin words keep their trailing space; each CJK character is its own unit."""
    out, word = [], ""
    for ch in text:
        if "\u2e80" <= ch <= "\u9fff" or "\u3000" <= ch <= "\u303f" or "\uff00" <= ch <= "\uffef":
            if word:
                out.append(word)
                word = ""
            out.append(ch)
        else:
            word += ch
            if ch == " ":
                out.append(word)
                word = ""
    return out + ([word] if word else [])


def wrap(text: str, font: ImageFont.FreeTypeFont, max_w: float) -> list[str]:
    lines, cur = [], ""
    for u in _units(text):
        if cur and font.getlength((cur + u).rstrip()) > max_w:
            lines.append(cur.rstrip())
            cur = u.lstrip()
        else:
            cur += u
    if cur.strip():
        lines.append(cur.rstrip())
    return lines


def layout(blocks: list[Block], w: int, h: int, margin: int, min_px: int, align: str,
           v_anchor: float) -> list[Block]:
    """Wrap and stack blocks in the w x h box inside ``margin``: shrink every size by 10% until
    the stack fits (not below ``min_px``), then drop trailing lines that still overflow."""
    max_w, max_h = w - 2 * margin, h - 2 * margin
    for b in blocks:
        b.size = max(min_px, b.size)
    while True:
        heights = []
        for b in blocks:
            b.lines = wrap(b.text, _font(b.font, b.size), max_w)
            heights.append(len(b.lines) * 1.3 * b.size + 0.5 * b.size)
        if sum(heights) <= max_h or all(b.size <= min_px for b in blocks):
            break
        for b in blocks:
            b.size = max(min_px, int(b.size * 0.9))
    while sum(heights) > max_h and any(b.lines for b in blocks):  # still too tall: cut from the end
        last = next(b for b in reversed(blocks) if b.lines)
        last.lines.pop()
        heights = [len(b.lines) * 1.3 * b.size + 0.5 * b.size for b in blocks]
    blocks = [b for b in blocks if b.lines]
    y = margin + (max_h - sum(heights[: len(blocks)])) * v_anchor
    for b in blocks:
        f = _font(b.font, b.size)
        for line in b.lines:
            lw = f.getlength(line)
            x = margin + {"left": 0.0, "center": (max_w - lw) / 2, "right": max_w - lw}[align]
            b.boxes.append((x, y, x + lw, y + 1.3 * b.size))
            y += 1.3 * b.size
        y += 0.5 * b.size
    return blocks


def draw(im: Image.Image, blocks: list[Block], rng, light_bg: bool | None, panel_prob: float) -> Image.Image:
    """Draw the laid-out blocks; on photos (``light_bg`` None) pick colours from the pixels under
    the text and add a translucent panel or an outline so the text stays legible."""
    im = im.convert("RGB")
    stroke, stroke_fill = 0, None
    if light_bg is None:
        xs = [v for b in blocks for bx in b.boxes for v in (bx[0], bx[2])]
        ys = [v for b in blocks for bx in b.boxes for v in (bx[1], bx[3])]
        region = (int(min(xs)) - 8, int(min(ys)) - 8, int(max(xs)) + 8, int(max(ys)) + 8)
        mean = np.asarray(im.crop(region)).reshape(-1, 3).mean(0)
        light_bg = _luma(mean) > 128
        if rng.random() < panel_prob:
            over = Image.new("RGBA", im.size, (0, 0, 0, 0))
            panel = (255, 255, 255, 170) if light_bg else (0, 0, 0, 150)
            ImageDraw.Draw(over).rounded_rectangle(region, radius=10, fill=panel)
            im = Image.alpha_composite(im.convert("RGBA"), over).convert("RGB")
        else:
            # soften texture under thin strokes: sigma 1 as Pillow's GaussianBlur(1.0), ~5x cheaper
            im = Image.fromarray(cv2.GaussianBlur(np.asarray(im), (0, 0), 1.0))
            stroke = 1
            stroke_fill = (255, 255, 255) if light_bg else (0, 0, 0)
    d = ImageDraw.Draw(im)
    fills: dict[str, tuple[int, int, int]] = {}  # one colour per role (a slide's bullets match)
    for k, b in enumerate(blocks):
        if b.role not in fills:
            accent = k == 0 and len(blocks) > 1 and rng.random() < 0.5
            fills[b.role] = _color(rng, not light_bg) if not accent else (
                (150, 20, 20) if light_bg else (255, 210, 80))
        fill = fills[b.role]
        f = _font(b.font, b.size)
        for line, (x, y, _, _) in zip(b.lines, b.boxes, strict=True):
            d.text((x, y + 0.15 * b.size), line, font=f, fill=fill,
                   stroke_width=max(stroke, b.size // 20 if stroke else 0), stroke_fill=stroke_fill)
    return im


def _weighted(rng, weights: dict[str, float]) -> str:
    keys = sorted(weights)
    p = np.array([weights[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


@dataclass
class Render:
    image: Image.Image
    blocks: list[Block]
    template: str
    language: str
    text_kind: str
    background: str
    background_ref: str | None
    font: str


def render_one(cfg: SyntheticTextConfig, seed: int, index: int, photos: PhotoPool) -> Render:
    """The render for (seed, index): every choice comes from ``default_rng([seed, index])``."""
    rng = np.random.default_rng([seed, index])
    w, h = parse_size(_weighted(rng, cfg.sizes))
    template, language = _weighted(rng, cfg.templates), _weighted(rng, cfg.languages)
    bg_kind = _weighted(rng, cfg.backgrounds)
    names = sorted(n for n, f in cfg.fonts.items() if f.cjk or language == "en")
    font_name = names[int(rng.integers(len(names)))]
    spec = cfg.fonts[font_name]
    tm = TextMaker(rng)
    u = min(w, h)
    # Block languages: mixed renders alternate en / zh between blocks, so both always appear.
    first = tm.pick(("en", "zh")) if language == "mixed" else language
    alt = [first, {"en": "zh", "zh": "en"}[first] if language == "mixed" else first]
    if template == "line":
        kind = "words" if rng.random() < 0.5 else "sentence"
        text = tm.words(language) if kind == "words" else tm.sentence(language)
        if language == "mixed":
            text = f"{tm.words('en')} {tm.words('zh')}" if kind == "words" else f"{tm.sentence('en')} {tm.sentence('zh')}"
        face = spec.bold if rng.random() < 0.5 else spec.regular
        size = int(u * rng.uniform(0.07, 0.12))
        # One line: shrink the size until the text fits the width (the layout may still cut it).
        size = max(cfg.min_font_px, min(size, int(size * 0.8 * w / max(1.0, _font(face, size).getlength(text)))))
        blocks = [Block("title", text, face, size)]
        align, anchor = tm.pick(("left", "center")), float(rng.uniform(0.1, 0.9))
    elif template == "paragraph":
        kind = "paragraph"
        blocks = [Block("body", tm.paragraph(language, int(rng.integers(2, 5))), spec.regular,
                        int(u * rng.uniform(0.04, 0.055)))]
        align, anchor = "left", float(rng.uniform(0.2, 0.8))
    elif template == "poster":
        kind = "structured"
        blocks = [Block("title", tm.title(alt[0]), spec.bold, int(u * rng.uniform(0.09, 0.13))),
                  Block("heading", tm.subtitle(alt[1]), spec.regular, int(u * rng.uniform(0.045, 0.06))),
                  Block("body", tm.paragraph(language, int(rng.integers(1, 3))), spec.regular,
                        int(u * rng.uniform(0.038, 0.05)))]
        align, anchor = "center", float(rng.uniform(0.15, 0.6))
    else:  # slide
        kind = "structured"
        size = int(u * rng.uniform(0.04, 0.055))
        blocks = [Block("title", tm.title(alt[0]), spec.bold, int(u * rng.uniform(0.07, 0.09)))]
        blocks += [Block("body", "• " + tm.bullet(alt[(i + 1) % 2]), spec.regular, size)
                   for i in range(int(rng.integers(2, 5)))]
        align, anchor = "left", 0.0
    if bg_kind == "photo":
        k = int(rng.integers(len(photos)))
        photo, ref = photos.get(k)
        im, light = photo_crop(rng, photo, w, h), None
    else:
        (im, light), ref = (plain if bg_kind == "plain" else gradient)(rng, w, h), None
    blocks = layout(blocks, w, h, int(u * rng.uniform(0.06, 0.1)), cfg.min_font_px, align, anchor)
    im = draw(im, blocks, rng, light, cfg.photo_panel_prob)
    return Render(im, blocks, template, language, kind, bg_kind, ref, font_name)


# --------------------------------------------------------------------------- ground-truth caption
_LAYOUT = {"line": "other", "paragraph": "document", "poster": "poster", "slide": "slide"}
_NAME = {"line": ("single line of text", "单行文字图"), "paragraph": ("paragraph of text", "段落文字图"),
         "poster": ("poster", "海报"), "slide": ("presentation slide", "演示文稿页面")}
_LANG = {"en": ("English", "英文"), "zh": ("Chinese", "中文"), "mixed": ("English and Chinese", "中英文")}
_BG = {"plain": ("a plain", "纯色"), "gradient": ("a gradient", "渐变"), "photo": ("a photo", "照片")}
_POS_ZH = {"top-left": "左上", "top": "上方", "top-right": "右上", "left": "左侧", "center": "中部",
           "right": "右侧", "bottom-left": "左下", "bottom": "下方", "bottom-right": "右下", "full": "整幅"}
_ROLE_ZH = {"title": "标题", "heading": "副标题", "body": "正文"}


def position(box: tuple[float, float, float, float], w: int, h: int) -> str:
    x0, y0, x1, y1 = box
    if (x1 - x0) > 0.75 * w and (y1 - y0) > 0.6 * h:
        return "full"
    col = ("left", "", "right")[min(2, int(3 * (x0 + x1) / 2 / w))]
    row = ("top", "", "bottom")[min(2, int(3 * (y0 + y1) / 2 / h))]
    return "-".join(p for p in (row, col) if p) or "center"


def caption_json(r: Render) -> dict:
    """The ground truth in the captioning text schema's shape: layout, blocks, en, zh."""
    w, h = r.image.size
    blocks = []
    for b in r.blocks:
        box = (min(x[0] for x in b.boxes), b.boxes[0][1], max(x[2] for x in b.boxes), b.boxes[-1][3])
        text = _join(b.lines)
        blocks.append({"text": text, "position": position(box, w, h), "role": b.role})
    ne, nz = _NAME[r.template]
    le, lz = _LANG[r.language]
    be, bz = _BG[r.background]
    en = (f"A {ne} with {le} text on {be} background. " +
          " ".join(f'{"The" if i == 0 else "Then the"} {b["role"]} at the {b["position"]} reads "{b["text"]}".'
                   for i, b in enumerate(blocks)))
    zh = f"一张{bz}背景上的{lz}{nz}。" + "".join(
        f"{_POS_ZH[b['position']]}的{_ROLE_ZH.get(b['role'], '文字')}写着“{b['text']}”。" for b in blocks)
    return {"layout": _LAYOUT[r.template], "blocks": blocks, "en": en, "zh": zh}


def _join(lines: list[str]) -> str:
    """Wrapped lines back to block text: a space between Latin line ends, none between CJK."""
    out = ""
    for line in lines:
        if out and not ("\u2e80" <= out[-1] <= "\u9fff" or "\u2e80" <= line[0] <= "\u9fff"):
            out += " "
        out += line
    return out


@functools.lru_cache(maxsize=1)
def text_validator():
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads(TEXT_SCHEMA_PATH.read_text()))


# --------------------------------------------------------------------------- worker
def encode(im: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=1)  # several times faster than 6 on photo backgrounds
    else:
        im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def render_rows(indices: list[int], cfg: SyntheticTextConfig, seed: int, photos: PhotoPool,
                render_hash: str, ocr: bool = True) -> pa.Table:
    """RENDER_SCHEMA rows for these indices; a failure is that row's ``error``, never the batch's."""
    from common.ocr import char_agreement, read_text

    from .readers import make_id

    cols: dict[str, list] = {f.name: [] for f in RENDER_SCHEMA}
    threads = max(1, int(cfg.cpus_per_worker))
    for i in indices:
        row = dict.fromkeys(cols)
        row.update(id=make_id(f"{SOURCE}:seed={seed}", str(i)), index=i, seed=seed, source=SOURCE,
                   render_config_hash=render_hash)
        try:
            r = render_one(cfg, seed, i, photos)
            cap = caption_json(r)
            text_validator().validate(cap)
            lines = [(ln, b.role, bx) for b in r.blocks for ln, bx in zip(b.lines, b.boxes, strict=True)]
            row.update(template=r.template, language=r.language, text_kind=r.text_kind, background=r.background,
                       background_ref=r.background_ref, font=r.font, width=r.image.width, height=r.image.height,
                       text="\n".join(ln for ln, _, _ in lines), caption=cap["en"],
                       caption_text=json.dumps(cap, ensure_ascii=False),
                       boxes=[{"text": ln, "role": role, "x0": bx[0], "y0": bx[1], "x1": bx[2], "y1": bx[3]}
                              for ln, role, bx in lines],
                       image=encode(r.image, cfg.store_format, cfg.store_quality))
        except Exception as e:  # noqa: BLE001 - one bad render is a row with a reason
            row["error"] = f"render: {type(e).__name__}: {e}"
        if ocr and cfg.ocr.engine != "none" and row["error"] is None:
            try:
                got = read_text(r.image, engine=cfg.ocr.engine, threads=threads)
                row.update(ocr_engine=got.engine, ocr_text=got.text,
                           ocr_score=char_agreement(row["text"], got.text, ignore_case=cfg.ocr.ignore_case))
            except Exception as e:  # noqa: BLE001 - a failed read-back is recorded, not fatal
                row.update(ocr_engine=cfg.ocr.engine, error=f"ocr: {type(e).__name__}: {e}")
        for k in cols:
            cols[k].append(row[k])
    return pa.Table.from_pydict(cols, schema=RENDER_SCHEMA)


def render_task(batch: pa.Table, cfg: SyntheticTextConfig, seed: int, photos: PhotoPool, render_hash: str,
                output_uri: str, done_ref=None, storage_options: dict | None = None) -> pa.Table:
    """Ray Data entry point: render the batch's indices not yet committed, write them as a Lance
    fragment, hand back only the fragment metadata (the driver commits)."""
    import lance.fragment
    import ray

    done = ray.get(done_ref) if done_ref is not None else None
    idx = np.asarray(batch.column("id").to_numpy(), np.int64)
    if done is not None:
        idx = idx[~np.isin(idx, done)]
    idx = idx.tolist()
    frags = []
    if idx:
        rows = render_rows(idx, cfg, seed, _cached_pool(photos), render_hash)
        frags = lance.fragment.write_fragments(rows, output_uri, schema=RENDER_SCHEMA,
                                               storage_options=storage_options)
    return pa.table({"fragment": pa.array([json.dumps(f.to_json()) for f in frags], pa.string()),
                     "rows": pa.array([f.num_rows for f in frags], pa.int64())})


_POOLS: dict[tuple, PhotoPool] = {}


def _cached_pool(p: PhotoPool) -> PhotoPool:
    """One decoded photo pool per worker process (Ray reuses task workers across batches)."""
    key = (p.table, p.version, len(p.ids))
    if key not in _POOLS:
        _POOLS.clear()
        _POOLS[key] = p
    return _POOLS[key]


# --------------------------------------------------------------------------- decisions
def decide(t: pa.Table, cfg: SyntheticTextConfig) -> pa.Table:
    """DECISION_SCHEMA rows from stored ``error`` / ``ocr_score`` (null score = not read: passes)."""
    from .synthetic_schema import DECISION_SCHEMA

    err = t.column("error").to_pylist()
    score = t.column("ocr_score").to_pylist()
    reason = [REJECT_RENDER if e else (REJECT_OCR if s is not None and s < cfg.thresholds.min_ocr_score else None)
              for e, s in zip(err, score, strict=True)]
    return pa.Table.from_arrays([t.column("id"), pa.array([r is None for r in reason]), pa.array(reason, pa.string()),
                                 pa.array([cfg.threshold_hash()] * t.num_rows, pa.string())], schema=DECISION_SCHEMA)


def apply_decisions(uri: str, cfg: SyntheticTextConfig, storage_options: dict | None = None) -> tuple[dict, int]:
    """Decide from the stored columns; decision columns are replaced (Lance drop + merge on ``id``:
    images are not rewritten). Idempotent. Returns (reason counts with ``kept``, version)."""
    import lance

    from .decide import reason_counts
    from .synthetic_schema import DECISION_FIELDS

    ds = lance.dataset(uri, storage_options=storage_options)
    decisions = decide(ds.to_table(columns=["id", "error", "ocr_score"]), cfg)
    stale = [c for c in DECISION_FIELDS if c in ds.schema.names]
    if stale:
        ds.drop_columns(stale)
        ds = lance.dataset(uri, storage_options=storage_options)
    ds.merge(decisions, left_on="id")
    ds = lance.dataset(uri, storage_options=storage_options)
    return reason_counts(ds), ds.version


# --------------------------------------------------------------------------- driver
@dataclass
class SynthSummary:
    output: str
    version: int
    rows: int
    rendered_now: int
    seconds: float
    render_seconds: float
    reasons: dict[str, int]
    report: str | None = None

    def text(self) -> str:
        kept = self.reasons.get("kept", 0)
        lines = [f"output {self.output} (version {self.version}): {self.rows} renders, {kept} kept, "
                 f"{self.rows - kept} rejected"]
        lines += [f"  {k:<14} {v:>8}  {100.0 * v / max(1, self.rows):5.1f}%"
                  for k, v in sorted(self.reasons.items(), key=lambda kv: -kv[1])]
        rate = self.rendered_now / self.render_seconds if self.render_seconds > 0 else 0.0
        lines.append(f"rendered {self.rendered_now} this run in {self.render_seconds:.1f}s ({rate:.2f} renders/s); "
                     f"total {self.seconds:.1f}s")
        if self.report:
            lines.append(f"report: {self.report}")
        return "\n".join(lines)


def _open(uri: str, storage_options: dict | None):
    import lance

    try:
        return lance.dataset(uri, storage_options=storage_options)
    except (ValueError, OSError, FileNotFoundError):
        if "://" not in uri and os.path.isdir(uri) and os.listdir(uri):
            raise ConfigError(f"--output: {uri} exists and is not a Lance table") from None
        return None


def _check_output(ds, seed: int, render_hash: str) -> None:
    from .synthetic_schema import RENDER_SCHEMA as S

    missing = [n for n in S.names if n not in ds.schema.names]
    if missing:
        raise ConfigError(f"--output: {ds.uri} holds another kind of table (missing {', '.join(missing[:5])}); "
                          "choose another --output")
    meta = ds.schema.metadata or {}
    if meta.get(b"synthetic.seed", b"").decode() != str(seed):
        raise ConfigError(f"--seed: {ds.uri} was generated with seed {meta.get(b'synthetic.seed', b'?').decode()}, "
                          f"this run has {seed}; use that seed to resume/extend or choose another --output")
    if meta.get(b"synthetic.render_config_hash", b"").decode() != render_hash:
        raise ConfigError(f"--config: {ds.uri} was rendered with another render config (or --backgrounds); "
                          "rerun with the same settings, use --rethreshold to change thresholds only, "
                          "or choose another --output")


def run_synthesis(output: str, n: int, cfg: SyntheticTextConfig, backgrounds: str | None = None,
                  seed: int | None = None, commit_every: int = 1_000, progress: bool = True, report: bool = True,
                  storage_options: dict | None = None, num_cpus: int | None = None) -> SynthSummary:
    """Render indices 0..n-1 of ``seed`` into ``output`` (resuming: only indices not yet committed),
    read each back with OCR, then decide. Rerunning with a larger ``n`` extends the table."""
    import lance
    import ray
    from ray.data import DataContext

    from .run import commit_fragments

    t0 = time.time()
    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    if commit_every < 1:
        raise ConfigError(f"--commit-every must be >= 1, got {commit_every}")
    seed = cfg.seed if seed is None else seed
    photos = (PhotoPool.from_table(backgrounds, cfg.max_background_rows, storage_options) if backgrounds
              else PhotoPool(None, None, [], [], []))
    bg_ref = f"{backgrounds}@{photos.version}" if backgrounds else None
    render_hash = cfg.render_hash(bg_ref)
    if cfg.ocr.engine != "none":  # a missing OCR engine stops here, naming the setting
        from common.ocr import read_text

        try:
            read_text(Image.new("RGB", (64, 32), "white"), engine=cfg.ocr.engine)
        except RuntimeError as e:
            raise ConfigError(f"ocr.engine: {e}") from None

    ds = _open(output, storage_options)
    if ds is None:
        meta = {b"source": SOURCE.encode(), b"synthetic.seed": str(seed).encode(),
                b"synthetic.render_config_hash": render_hash.encode(),
                b"synthetic.backgrounds": (bg_ref or "samples").encode()}
        schema = RENDER_SCHEMA.with_metadata(meta)
        ds = lance.write_dataset(schema.empty_table(), output, schema=schema, mode="create",
                                 storage_options=storage_options)
    else:
        _check_output(ds, seed, render_hash)
    done = np.asarray(ds.to_table(columns=["index"]).column("index").to_numpy(), np.int64)
    todo = n - int((done < n).sum())

    t_render, rendered = 0.0, 0
    if todo > 0:
        if not ray.is_initialized():
            ray.init(num_cpus=num_cpus, log_to_driver=progress, include_dashboard=False, ignore_reinit_error=True)
        t_render = time.time()
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = progress
        ctx.verbose_progress = False
        print(f"[{SOURCE}] rendering {todo} of {n} (seed {seed}; {n - todo} already in {output})", flush=True)
        done_ref = ray.put(np.sort(done)) if len(done) else None  # ~8 bytes per committed render
        written = ray.data.range(n, override_num_blocks=max(1, min(n // cfg.batch_size, 64))).map_batches(
            render_task, batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=cfg.cpus_per_worker,
            fn_kwargs={"cfg": cfg, "seed": seed, "photos": photos, "render_hash": render_hash,
                       "output_uri": output, "done_ref": done_ref, "storage_options": storage_options})
        _, rendered = commit_fragments(written, output, ds.version, commit_every, storage_options, SOURCE)
    render_seconds = time.time() - t_render if t_render else 0.0

    reasons, version = apply_decisions(output, cfg, storage_options)
    rows = sum(reasons.values())
    have = lance.dataset(output, storage_options=storage_options).to_table(columns=["index"]).column("index")
    if len(set(have.to_pylist())) != rows or rows < n:
        raise RuntimeError(f"row check failed: {rows} rows, {len(set(have.to_pylist()))} distinct indices, n={n}")
    summary = SynthSummary(output, version, rows, rendered, time.time() - t0, render_seconds, reasons)
    if report:
        summary.report = write_report(output, cfg, summary, storage_options)
    return summary


def rethreshold(output: str, cfg: SyntheticTextConfig, report: bool = True,
                storage_options: dict | None = None) -> SynthSummary:
    """Re-decide from stored OCR scores with ``cfg.thresholds``: no rendering, no OCR."""
    t0 = time.time()
    if _open(output, storage_options) is None:
        raise ConfigError(f"--output: no Lance table at {output} to rethreshold")
    reasons, version = apply_decisions(output, cfg, storage_options)
    s = SynthSummary(output, version, sum(reasons.values()), 0, time.time() - t0, 0.0, reasons)
    if report:
        s.report = write_report(output, cfg, s, storage_options)
    return s


# --------------------------------------------------------------------------- report
def _png(fig) -> str:
    return fig_png(fig)


def write_report(uri: str, cfg: SyntheticTextConfig, summary: SynthSummary, storage_options: dict | None = None,
                 path: str | None = None, examples: int = 12) -> str:
    """HTML: reasons, OCR-score histogram with the threshold, keep rate per template x language,
    and example renders (kept and rejected) with their exact and read-back text."""
    import base64
    import html

    import lance
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .table import read_images

    ds = lance.dataset(uri, storage_options=storage_options)
    t = ds.to_table(columns=["id", "template", "language", "background", "text", "ocr_text", "ocr_score", "keep",
                             "reject_reason", "error"], with_row_id=True).sort_by("id")
    keep = np.array(t["keep"].fill_null(False).to_pylist(), bool)
    score = np.array([np.nan if v is None else v for v in t["ocr_score"].to_pylist()], float)
    figs = []
    if np.isfinite(score).any():
        fig, ax = plt.subplots(figsize=(5.2, 2.8), dpi=90)
        bins = np.linspace(0, 1, 41)
        ax.hist(score[keep & np.isfinite(score)], bins=bins, color="#3b82f6", alpha=0.8, label="kept")
        ax.hist(score[~keep & np.isfinite(score)], bins=bins, color="#ef4444", alpha=0.6, label="rejected")
        ax.axvline(cfg.thresholds.min_ocr_score, color="black", ls="--", lw=1.2)
        ax.set_title(f"ocr_score (n={int(np.isfinite(score).sum())}); min {cfg.thresholds.min_ocr_score:g}", fontsize=10)
        ax.legend(fontsize=8)
        figs.append(_png(fig))
    tmpl, lang = t["template"].to_pylist(), t["language"].to_pylist()
    fig, ax = plt.subplots(figsize=(5.2, 2.8), dpi=90)
    for j, lg in enumerate(LANGUAGES):
        rates = [keep[[a == tp and b == lg for a, b in zip(tmpl, lang, strict=True)]].mean()
                 if any(a == tp and b == lg for a, b in zip(tmpl, lang, strict=True)) else 0.0 for tp in TEMPLATES]
        ax.bar(np.arange(len(TEMPLATES)) + 0.27 * (j - 1), rates, width=0.27, label=lg)
    ax.set_xticks(range(len(TEMPLATES)), TEMPLATES)
    ax.set_ylim(0, 1.05)
    ax.set_title("keep rate by template and language", fontsize=10)
    ax.legend(fontsize=8)
    figs.append(_png(fig))
    # Examples: the first kept and rejected rows by id (deterministic), as JPEG thumbnails.
    pick = ([i for i in range(t.num_rows) if keep[i]][: examples // 2] +
            [i for i in range(t.num_rows) if not keep[i]][: examples - examples // 2])
    cards = []
    if pick:
        datas = read_images(ds, [t["_rowid"][i].as_py() for i in pick])
        for i, data in zip(pick, datas, strict=True):
            img = ""
            if data:
                im = Image.open(io.BytesIO(data)).convert("RGB")
                im.thumbnail((320, 320))
                img = f"<img src='data:image/jpeg;base64,{base64.b64encode(encode(im, 'jpeg', 85)).decode()}'>"
            row = {c: t[c][i].as_py() for c in ("template", "language", "background", "text", "ocr_text",
                                                  "ocr_score", "reject_reason", "error")}
            sc = "—" if row["ocr_score"] is None else f"{row['ocr_score']:.3f}"
            cards.append(f"<div class='card'>{img}<p><b>{row['template']} / {row['language']} / {row['background']}"
                         f"</b> — {html.escape(row['reject_reason'] or 'kept')}, ocr {sc}</p>"
                         f"<p class='t'>text: {html.escape(row['text'] or row['error'] or '')}</p>"
                         f"<p class='t'>read: {html.escape(row['ocr_text'] or '')}</p></div>")
    reasons = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td><td>{100.0 * v / max(1, summary.rows):.1f}%</td></tr>"
                      for k, v in sorted(summary.reasons.items(), key=lambda kv: -kv[1]))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>synthetic text report</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}} .card{{display:inline-block;vertical-align:top;
width:330px;margin:6px;font-size:12px}} .t{{white-space:pre-wrap;color:#444}}</style></head><body>
<h2>{SOURCE} — {html.escape(uri)} (version {summary.version})</h2>
<p>{summary.rows} renders; {summary.rendered_now} rendered this run in {summary.render_seconds:.1f}s;
OCR engine {html.escape(cfg.ocr.engine)}; threshold hash {cfg.threshold_hash()}.</p>
<table><tr><th>reason</th><th>rows</th><th>share</th></tr>{reasons}</table>
<h3>ocr_score (blue kept, red rejected; dashed: thresholds.min_ocr_score) and keep rate</h3>
{''.join(f"<img src='data:image/png;base64,{f}'>" for f in figs)}
<h3>Examples (kept first, then rejected)</h3>{''.join(cards)}</body></html>"""
    out = path or (uri.rstrip("/") + ".report.html" if "://" not in uri else "synthetic_text.report.html")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(page)
    return out
