"""The adapters a served model has: the names a client may ask for, and the background listing of the folder.

Where adapters are read from (a bucket through Ray's loader, a local folder by the workflow's
LLMServer) is ``patches/ray_serve_adapter_folders.py``, which lists the folder for the catalogue here.
"""

from __future__ import annotations

import re

from ..patches import ray_serve_adapter_folders

# What a client may call an adapter ("<model id>:<name>"): one folder name of the adapters folder.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]+")


def adapter_name_allowed(name: str) -> bool:
    """Whether ``name`` can be an adapter folder's name (no path, no climbing)."""
    return bool(ADAPTER_NAME.fullmatch(name)) and name not in (".", "..")


class AdapterCatalogue:
    """The adapters a served model has: the subfolders of its adapters folder, listed in the background.

    A replica asks :meth:`knows` before anything reads storage for a requested adapter: a name
    outside ``ADAPTER_NAME`` or not in the last listing is unknown. No client request reads
    storage here: the listing is refreshed every ``refresh_s`` by a task on the replica's event
    loop (an adapter published after the deploy is served once a listing has seen it).
    """

    def __init__(self, adapters_uri: str, *, refresh_s: float = 5.0, list_names=None):
        self._uri = adapters_uri
        self._refresh_s = refresh_s
        self._list_names = list_names or ray_serve_adapter_folders.list_adapters
        self._names: set[str] = set()
        self._task = None
        self._starting = None

    async def start(self) -> None:
        """List once, then keep listing in the background (on the replica's event loop; requests that
        arrive together wait for the one first listing)."""
        import asyncio

        if self._task is not None:
            return
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._task is None:
                await self.refresh()
                self._task = asyncio.get_running_loop().create_task(self._keep_listing())

    async def refresh(self) -> None:
        import asyncio

        self._names = set(await asyncio.to_thread(self._list_names, self._uri))

    async def _keep_listing(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception as err:  # noqa: BLE001 - the next round retries; the last listing stays
                print(f"[serve] listing the adapters in {self._uri} failed, retrying: {type(err).__name__}: {err}",
                      flush=True)

    def knows(self, name: str) -> bool:
        return adapter_name_allowed(name) and name in self._names

    def names(self) -> list[str]:
        """The adapters of the last listing whose names a client may ask for."""
        return sorted(n for n in self._names if adapter_name_allowed(n))

