"""Bridge between ray 2.54's ray.data.llm engine stage and vLLM >= 0.32, for Ray worker processes.

ray 2.54.1's `vLLMEngineStage` builds every engine prompt as `vllm.inputs.data.TextPrompt` /
`vllm.inputs.data.TokensPrompt`; vLLM 0.32 removed the module `vllm.inputs.data` (the same TypedDicts
are `vllm.inputs.TextPrompt` / `vllm.inputs.TokensPrompt`), so every request fails with
`AttributeError: module 'vllm.inputs' has no attribute 'data'`. `alias_vllm_inputs_data` is the
`worker_process_setup_hook` of the engine's runtime_env: it registers `vllm.inputs.data` as an alias
namespace holding those two names. It is a no-op where vLLM is absent or still has
`vllm.inputs.data` (the older releases ray 2.54 was written against); drop it with a ray release
that no longer uses that module.

It never imports vLLM itself: the hook runs in every worker of the job (blob readers, chat template
stage), and importing vLLM costs seconds of CPU (torch) in processes that never run an engine. The
alias is added right after `vllm.inputs` executes, in the processes that do import it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

_MODULE = "vllm.inputs"
_ALIASED = ("TextPrompt", "TokensPrompt")


def _alias(inputs: types.ModuleType) -> None:
    if hasattr(inputs, "data") or importlib.util.find_spec(f"{_MODULE}.data") is not None:
        return
    data = types.ModuleType(f"{_MODULE}.data", "Alias of vllm.inputs' prompt types (captioning.vllm_compat).")
    for name in _ALIASED:
        setattr(data, name, getattr(inputs, name))
    sys.modules[data.__name__] = data
    inputs.data = data


class _AliasAfterImport(importlib.abc.MetaPathFinder):
    """Finds `vllm.inputs` with the regular path finder and aliases once its module has executed."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != _MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        exec_module = spec.loader.exec_module

        def exec_then_alias(module: types.ModuleType) -> None:
            exec_module(module)
            _alias(module)

        spec.loader.exec_module = exec_then_alias  # type: ignore[method-assign]
        return spec


def alias_vllm_inputs_data() -> None:
    """Ray worker_process_setup_hook (also safe to call in the driver; idempotent)."""
    if _MODULE in sys.modules:
        _alias(sys.modules[_MODULE])
    elif importlib.util.find_spec("vllm") is not None and not any(
            isinstance(f, _AliasAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasAfterImport())


SETUP_HOOK = f"{__name__}.{alias_vllm_inputs_data.__name__}"
"""The runtime_env value: `{"worker_process_setup_hook": SETUP_HOOK}`."""
