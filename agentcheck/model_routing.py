"""Which of a backend's slots serve a model: the pure rule behind per-model replies and per-model picking.

A plain llama-server runs one model on all its slots. A llama.cpp router (``--models-dir``) runs each loaded
model as a child llama-server with slots of its own, so its models never share slots, and a model that is
not loaded has none until a request loads it. A fleet entry's ``models:`` overrides discovery; several
models declared on a plain server are names for the same slots, which are then split between them (in the
declared order, the first ones getting the remainder), so the pools together never exceed the server.
"""

from __future__ import annotations

from dataclasses import replace

from agentcheck.status import BackendStatus, ModelLoad, ModelStatus, State
from fleet import Backend


def served_models(backend: Backend, status: BackendStatus) -> tuple[str, ...]:
    """The models this backend serves: declared in the fleet file, else discovered."""
    if backend.models:
        return backend.models
    return tuple(model.name for model in status.models)


def model_share(backend: Backend, status: BackendStatus, model: str) -> ModelStatus | None:
    """The slots of ``backend`` that serve ``model`` (None: it does not serve it)."""
    served = served_models(backend, status)
    if model not in served:
        return None
    if status.router:
        discovered = {item.name: item for item in status.models}
        return discovered.get(model, ModelStatus(model, ModelLoad.UNLOADED))
    if len(served) == 1:
        return ModelStatus(model, ModelLoad.LOADED, status.slots_total, status.slots_processing)
    index = served.index(model)
    share = status.slots_total // len(served) + (1 if index < status.slots_total % len(served) else 0)
    # Which alias the busy slots serve is not known: each share counts as busy as it can be.
    return ModelStatus(model, ModelLoad.LOADED, share, min(share, status.slots_processing))


def model_view(status: BackendStatus, share: ModelStatus) -> BackendStatus:
    """The backend's status as one model's pool sees it: that model's slots only. A model that is not loaded
    has no slots yet; the caller decides how to offer it (agentcheck.policy.cold_model_reply)."""
    if status.state is not State.READY:
        return status
    return replace(status, slots_total=share.slots_total, slots_processing=share.slots_processing,
                   model=share.name, slot_tasks=())
