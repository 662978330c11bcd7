"""A thin layer over kubernetes_asyncio: raw JSON list / watch / write calls for the few kinds
the controller needs, so every kind (core, discovery, SMI) goes through one code path and the
objects stay plain dicts, exactly as the manifest source gives them."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from meshproxy.controller.objects import KINDS
from meshproxy.controller.settings import ControllerSettings

AUTH = ["BearerToken"]


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


async def make_api_client(settings: ControllerSettings) -> client.ApiClient:
    """In-cluster credentials, else a kubeconfig, else a bare `--masterURL` (tests)."""
    configuration = client.Configuration()
    kubeconfig = settings.kubeconfig or os.environ.get("KUBECONFIG")
    if kubeconfig:
        await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    elif settings.master_url:
        configuration.host = settings.master_url
    else:
        config.load_incluster_config(client_configuration=configuration)
    if settings.master_url:
        configuration.host = settings.master_url
    return client.ApiClient(configuration)


# Kinds the controller writes or looks up but does not watch.
OTHER_KINDS = {"Deployment": ("apps/v1", "deployments"), "ConfigMap": ("v1", "configmaps")}


def collection_path(kind: str, namespace: str | None = None) -> str:
    group_version, plural = KINDS.get(kind) or OTHER_KINDS[kind]
    base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    if namespace:
        return f"{base}/namespaces/{namespace}/{plural}"
    return f"{base}/{plural}"


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api

    async def request(
        self,
        method: str,
        path: str,
        query: list[tuple[str, Any]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        try:
            response = await self.api.call_api(
                path,
                method,
                query_params=query or [],
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=AUTH,
                _preload_content=False,
            )
        except ApiException as exc:
            raise KubeError(exc.status or 0, str(exc.reason)) from None
        except aiohttp.ClientError as exc:
            raise KubeError(0, f"API server unreachable: {exc}") from None
        status = response.status
        text = await response.text()
        response.release()
        if status >= 300:
            raise KubeError(status, text[:300])
        return json.loads(text) if text else None

    async def list(
        self, kind: str, namespace: str | None = None, **query: Any
    ) -> tuple[list[Any], str]:
        """(items with their `kind` filled in, the list's resourceVersion)."""
        params = [(k, v) for k, v in query.items()]
        data = await self.request("GET", collection_path(kind, namespace), params)
        items = data.get("items") or []
        api_version = (KINDS.get(kind) or OTHER_KINDS[kind])[0]
        for item in items:  # list items carry no kind/apiVersion
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", api_version)
        return items, (data.get("metadata") or {}).get("resourceVersion", "")

    async def watch(
        self, kind: str, resource_version: str, timeout_seconds: int
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(event type, raw object) until the server ends the watch; a `410 Gone` raises
        KubeError(410): the caller must list again."""
        path = collection_path(kind)

        async def call(**kwargs: Any) -> Any:
            query = [("watch", "true"), ("allowWatchBookmarks", "true")]
            if kwargs.get("resource_version"):
                query.append(("resourceVersion", kwargs["resource_version"]))
            query.append(("timeoutSeconds", kwargs["timeout_seconds"]))
            return await self.api.call_api(
                path,
                "GET",
                query_params=query,
                header_params={"Accept": "application/json"},
                auth_settings=AUTH,
                _preload_content=False,
                _request_timeout=kwargs["timeout_seconds"] + 10,
            )

        stream = watch.Watch().stream(
            call, resource_version=resource_version, timeout_seconds=timeout_seconds
        )
        try:
            async for event in stream:
                yield event["type"], event["raw_object"]
        except ApiException as exc:
            raise KubeError(exc.status or 0, str(exc.reason)) from None
        except aiohttp.ClientError as exc:
            raise KubeError(0, f"API server unreachable: {exc}") from None
        finally:
            await stream.close()

    async def close(self) -> None:
        await self.api.close()
