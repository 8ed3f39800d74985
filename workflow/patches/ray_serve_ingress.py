"""Ray Serve LLM's OpenAI ingress (Ray 2.60's private ``OpenAiIngress``), opened up for the workflow's ingress.

``serving/ingress.py``'s ``WorkflowIngress`` subclasses :class:`Ingress` and fills in its hooks: what
wraps the replica's app (``wrap_app``: the API key check, the CORS rule), what lists a base model's
adapters folder (``adapter_catalogue``), and what a route answers for an adapter that folder does not
list (``refusal``). :data:`ENDPOINTS` names the routes Ray builds from the class's methods.

An adapters folder on the serving machine (``ray_serve_adapter_folders.py``) is one Ray's ingress
cannot read: its adapters are listed (``/v1/models``) and described (``/v1/models/<id>``) from the
folder's catalogue here; a bucket's keep Ray's own listing.

``serving.app.ingress_cls_config`` names the subclass only on the Ray versions in ``TESTED``
(``serving.app.INGRESS_TESTED``). Only the Ray replicas import this module.
"""

from __future__ import annotations

from ray.llm._internal.serve.core.configs.openai_api_models import ModelList
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, OpenAiIngress

from . import ray_serve_adapter_folders as adapter_folders

TESTED = {"ray": "==2.60.*"}
# The routes Ray builds from the ingress class's methods of these names.
ENDPOINTS = tuple(DEFAULT_ENDPOINTS)


class Ingress(OpenAiIngress):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter_catalogues = {base: self.adapter_catalogue(path) for base, path in self._lora_paths.items()}

    def adapter_catalogue(self, adapters_uri: str):
        """What lists a base model's adapters folder: an object with ``async start()``, ``knows(name)``, ``names()``."""
        raise NotImplementedError

    def wrap_app(self, app):
        """The replica's app as Serve is to run it (``app`` is Ray's FastAPI app, its middleware still editable)."""
        return app

    def _set_asgi_app(self, app) -> None:
        super()._set_asgi_app(self.wrap_app(app))

    async def model(self, model_id: str):
        """Ray's card of ``model_id``; an adapter of a local folder (Ray reads buckets only) gets its base model's
        card under its own id, if the folder lists it."""
        base, _, adapter = model_id.partition(":")
        if not adapter or adapter_folders.local_folder(self._lora_paths.get(base)) is None:
            return await super().model(model_id)
        catalogue = self.adapter_catalogues[base]
        await catalogue.start()
        if not catalogue.knows(adapter):
            return None
        card = self._model_cards[base]
        return card.model_copy(update={"id": model_id, "metadata": {**card.metadata, "base_model_id": base}})

    async def models(self) -> ModelList:
        """Ray's list; with a local adapters folder (Ray lists buckets only) the adapters the folder lists."""
        if not any(adapter_folders.local_folder(path) for path in self._lora_paths.values()):
            return await super().models()
        cards = []
        for base in self._model_cards:
            cards.append(await self.model(base))
            catalogue = self.adapter_catalogues.get(base)
            if catalogue is not None:
                await catalogue.start()
                cards += [await self.model(f"{base}:{name}") for name in catalogue.names()]
        return ModelList(data=[card for card in cards if card is not None])
