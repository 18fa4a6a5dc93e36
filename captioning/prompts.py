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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from captioning.config import ConfigError
from captioning.schema import CAPTION_TYPES

ROUTE = "route"
KINDS: tuple[str, ...] = (ROUTE, *CAPTION_TYPES)


class InvalidResponse(ValueError):
    """A model answer that is not schema-valid JSON; `kind` is the failure class."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass(frozen=True)
class PromptSet:
    version: str
    system: str
    prompts: dict[str, str]
    """kind -> user instruction (with the schema text substituted)."""
    schemas: dict[str, dict[str, Any]]
    """kind -> JSON schema (sent in every request and checked on every answer)."""

    @classmethod
    def load(cls, root: str | Path, version: str) -> PromptSet:
        root = Path(root)
        pdir, sdir = root / "prompts" / version, root / "schemas" / version
        if not pdir.is_dir() or not sdir.is_dir():
            raise ConfigError(f"config field 'prompt_version': no prompt set {version!r} "
                              f"(expected {pdir} and {sdir})")
        schemas: dict[str, dict[str, Any]] = {}
        prompts: dict[str, str] = {}
        for kind in KINDS:
            sfile, pfile = sdir / f"{kind}.json", pdir / f"{kind}.txt"
            for f in (sfile, pfile):
                if not f.is_file():
                    raise ConfigError(f"config field 'prompt_version': prompt set {version!r} lacks {f}")
            try:
                schema = json.loads(sfile.read_text())
                jsonschema.Draft202012Validator.check_schema(schema)
            except (json.JSONDecodeError, jsonschema.SchemaError) as e:
                raise ConfigError(f"config field 'prompt_version': {sfile} is not a valid JSON schema: "
                                  f"{str(e).splitlines()[0]}") from e
            schemas[kind] = schema
            prompts[kind] = pfile.read_text().strip().replace("{schema}", json.dumps(schema, ensure_ascii=False))
        system = (pdir / "system.txt").read_text().strip() if (pdir / "system.txt").is_file() else ""
        return cls(version=version, system=system, prompts=prompts, schemas=schemas)

    @functools.cached_property
    def _validators(self) -> dict[str, jsonschema.Draft202012Validator]:
        return {kind: jsonschema.Draft202012Validator(schema) for kind, schema in self.schemas.items()}

    def messages(self, kind: str, image_jpeg: bytes) -> list[dict[str, Any]]:
        """OpenAI chat messages: the system prompt, then the image and the instruction for `kind`.

        Both the HTTP client and ray.data.llm (vLLM's chat parser) take this format.
        """
        url = "data:image/jpeg;base64," + base64.b64encode(image_jpeg).decode("ascii")
        user = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": self.prompts[kind]}]
        msgs: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": user}]

    def response_format(self, kind: str) -> dict[str, Any]:
        return {"type": "json_schema",
                "json_schema": {"name": f"{kind}_{self.version}", "schema": self.schemas[kind], "strict": True}}

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
