"""Versioned prompts + JSON schemas, request messages and response validation, shared by both modes.

A prompt set is data: `prompts/<version>/{system,route,<type>}.txt` and
`schemas/<version>/{route,<type>}.json` under a root directory. `{schema}` in a prompt is replaced by
the schema text so the model reads the exact contract that vLLM's structured output enforces. The
schema decides validity; we check it again on our side (`PromptSet.validate`).
"""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from captioning.config import ConfigError
from captioning.schema import CAPTION_TYPES, LANGUAGES

ROUTE = "route"
KINDS: tuple[str, ...] = (ROUTE, *CAPTION_TYPES)

# The shorter requests of an answer still cut at max_tokens_cap: a part whose answer holds, per
# language, the three caption lengths (the general caption) is asked again as one request for
# short + medium and one for dense alone; the answers are merged into the part's shape. Dense is
# most of the output, so it gets a request (and the whole token budget) of its own.
LEVEL_GROUPS: tuple[tuple[str, ...], ...] = (("short", "medium"), ("dense",))
ONLY_FIELDS = {"en": "This time write only these fields: {fields}.", "zh": "这次只写这些字段：{fields}。"}


class InvalidResponse(ValueError):
    """A model answer that is not schema-valid JSON; `kind` is the failure class."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass(frozen=True)
class PromptSet:
    """A versioned prompt set. A caption type is asked in one request (`<type>.txt` + `<type>.json`:
    both languages in one answer, as in v1) or in one request per language when the set has
    `<type>.<lang>.txt` + `<type>.<lang>.json` for every language (v2): each language's part is
    written from the image by an instruction in that language (with `system.<lang>.txt` as its
    system prompt), and the parts' answers are merged key by key and checked against `<type>.json`,
    the stored caption's schema. Request names ("parts") are the file stems: `general`,
    `general.en`, `general.zh`, ..."""

    version: str
    system: dict[str, str]
    """language ("" = default) -> system prompt."""
    prompts: dict[str, str]
    """part -> user instruction (with the schema text substituted)."""
    schemas: dict[str, dict[str, Any]]
    """part or caption type -> JSON schema (sent with every request and checked on every answer)."""
    parts: dict[str, tuple[str, ...]]
    """request kind (route or caption type) -> the parts it is asked in."""
    shorter: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """part -> the shorter requests it is asked as when its answer is still cut at the cap
    (`LEVEL_GROUPS`; named `<part>.<fields joined by '-'>`); parts without length levels are absent."""

    @classmethod
    def load(cls, root: str | Path, version: str) -> PromptSet:
        root = Path(root)
        pdir, sdir = root / "prompts" / version, root / "schemas" / version
        if not pdir.is_dir() or not sdir.is_dir():
            raise ConfigError(f"config field 'prompt_version': no prompt set {version!r} "
                              f"(expected {pdir} and {sdir})")

        def schema_of(sfile: Path) -> dict[str, Any]:
            if not sfile.is_file():
                raise ConfigError(f"config field 'prompt_version': prompt set {version!r} lacks {sfile}")
            try:
                schema = json.loads(sfile.read_text())
                jsonschema.Draft202012Validator.check_schema(schema)
            except (json.JSONDecodeError, jsonschema.SchemaError) as e:
                raise ConfigError(f"config field 'prompt_version': {sfile} is not a valid JSON schema: "
                                  f"{str(e).splitlines()[0]}") from e
            return schema

        schemas: dict[str, dict[str, Any]] = {}
        prompts: dict[str, str] = {}
        parts: dict[str, tuple[str, ...]] = {}
        for kind in KINDS:
            schemas[kind] = schema_of(sdir / f"{kind}.json")
            split = kind != ROUTE and all((pdir / f"{kind}.{lang}.txt").is_file() for lang in LANGUAGES)
            parts[kind] = tuple(f"{kind}.{lang}" for lang in LANGUAGES) if split else (kind,)
            for part in parts[kind]:
                pfile = pdir / f"{part}.txt"
                if not pfile.is_file():
                    raise ConfigError(f"config field 'prompt_version': prompt set {version!r} lacks {pfile}")
                schemas[part] = schema_of(sdir / f"{part}.json")
                prompts[part] = pfile.read_text().strip().replace("{schema}", json.dumps(schemas[part], ensure_ascii=False))
        system = {lang: (pdir / f"system{'.' + lang if lang else ''}.txt").read_text().strip()
                  for lang in ("", *LANGUAGES) if (pdir / f"system{'.' + lang if lang else ''}.txt").is_file()}
        shorter: dict[str, tuple[str, ...]] = {}
        for part in (p for kind in CAPTION_TYPES for p in parts[kind]):
            if not _has_levels(schemas[part]):
                continue
            lang = part.rsplit(".", 1)[1] if "." in part else "en"
            template = (pdir / f"{part}.txt").read_text().strip()
            shorter[part] = tuple(f"{part}.{'-'.join(group)}" for group in LEVEL_GROUPS)
            for group, sub in zip(LEVEL_GROUPS, shorter[part], strict=True):
                schemas[sub] = _only_levels(schemas[part], group)
                only = ONLY_FIELDS.get(lang, ONLY_FIELDS["en"]).format(fields=", ".join(f'"{f}"' for f in group))
                prompts[sub] = template.replace("{schema}", json.dumps(schemas[sub], ensure_ascii=False)) + "\n\n" + only
        return cls(version=version, system=system, prompts=prompts, schemas=schemas, parts=parts, shorter=shorter)

    @functools.cached_property
    def _validators(self) -> dict[str, jsonschema.Draft202012Validator]:
        return {kind: jsonschema.Draft202012Validator(schema) for kind, schema in self.schemas.items()}

    def messages(self, part: str, image: bytes, mime: str = "image/jpeg") -> list[dict[str, Any]]:
        """OpenAI chat messages: the system prompt (of the part's language, if the set has one), then
        the image and the instruction for `part`.

        Both the HTTP client and ray.data.llm (vLLM's chat parser) take this format.
        """
        url = f"data:{mime};base64," + base64.b64encode(image).decode("ascii")
        user = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": self.prompts[part]}]
        lang = part.rsplit(".", 1)[1] if "." in part else ""
        system = self.system.get(lang, self.system.get(""))
        msgs: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        return msgs + [{"role": "user", "content": user}]

    def merge(self, kind: str, texts: list[str]) -> tuple[str, Any]:
        """The stored caption of `kind` from its parts' validated answers: the single answer
        verbatim, or the parts' objects merged key by key (compact JSON, original strings);
        raises InvalidResponse if the merge does not satisfy `<kind>.json`."""
        if len(texts) == 1:
            return texts[0], self.validate(kind, texts[0])
        merged: dict[str, Any] = {}
        for t in texts:  # one level deep: shorter requests each hold some fields of {"en": {...}}
            for key, value in json.loads(t).items():
                both = isinstance(value, dict) and isinstance(merged.get(key), dict)
                merged[key] = {**merged[key], **value} if both else value
        text = json.dumps(merged, ensure_ascii=False, separators=(",", ":"))
        return text, self.validate(kind, text)

    def response_format(self, kind: str) -> dict[str, Any]:
        # OpenAI names allow [a-zA-Z0-9_-]: "general.zh" travels as "general-zh".
        return {"type": "json_schema", "json_schema": {"name": f"{kind.replace('.', '-')}_{self.version}",
                                                       "schema": self.schemas[kind], "strict": True}}

    def validate(self, kind: str, text: str) -> Any:
        """Parse and schema-check an answer; raise InvalidResponse(kind='invalid_json'|'schema')."""
        try:
            # strict=True (the default) rejects raw control characters inside strings.
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidResponse("invalid_json", str(e)) from None
        error = jsonschema.exceptions.best_match(self._validators[kind].iter_errors(value))
        if error is not None:
            path = "/".join(str(p) for p in error.absolute_path) or "<root>"
            raise InvalidResponse("schema", f"{path}: {error.message[:200]}")
        return value


def _has_levels(schema: dict[str, Any]) -> bool:
    """Every top-level property is an object that requires exactly the caption lengths."""
    levels = {f for group in LEVEL_GROUPS for f in group}
    props = schema.get("properties") or {}
    return bool(props) and all(p.get("type") == "object" and set(p.get("required", ())) == levels
                               for p in props.values())


def _only_levels(schema: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """`schema` with every language object narrowed to `fields`."""
    out = json.loads(json.dumps(schema))
    for p in out["properties"].values():
        p["properties"] = {f: p["properties"][f] for f in fields}
        p["required"] = list(fields)
    out.pop("title", None)
    return out
