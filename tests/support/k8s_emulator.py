"""A Kubernetes API on loopback for the operator's tests, driven by the real ``kubectl``.

kmock's ``KubernetesEmulator`` plus what kubectl and kopf need from a real API server
(``../shared/notes/testing-the-operator.md``):

- server-set metadata: ``uid``, ``creationTimestamp``, a ``resourceVersion`` bumped on every write,
  ``generation`` 1 on create and bumped when the spec changes (JSON merge patch semantics);
- ``/version`` reporting 1.32, so the ``kubectl`` dispatcher always runs the same client;
- an OpenAPI v3 document per group/version that declares ``fieldValidation`` on PATCH, so
  ``kubectl apply`` leaves validation to the server instead of failing to download a schema;
- list responses with their ``kind`` (``<Kind>List``) and ``apiVersion``;
- discovery of the core group as ``v1`` (kmock says ``/v1``) and without the short names kmock
  copies onto status subresources;
- resources registered from CRD files (ours in ``crds/``, the upstream ones in ``../shared/schemas``)
  and the built-in ones kmock bundles.

``EmulatedCluster`` runs it in a thread with its own event loop, so tests call ``kubectl`` as a plain
blocking subprocess, with their own kubeconfig and discovery cache.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import re
import shutil
import subprocess
import threading
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import yaml

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import kmock
    from kmock import ResourceInfo

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO.parent / "shared" / "schemas"
CRD_FILES = (
    REPO / "crds" / "autoglm.io_autoglmmodels.yaml",
    SCHEMAS / "argo-workflows.argoproj.io_workflows.yaml",
    SCHEMAS / "argo-workflows.argoproj.io_workflowtemplates.yaml",
    SCHEMAS / "kserve.serving.kserve.io_inferenceservices.yaml",
    SCHEMAS / "kserve.serving.kserve.io_clusterservingruntimes.yaml",
)
VERBS = {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}
#: The client every test runs (the /usr/bin/kubectl dispatcher picks one by the server's version).
KUBECTL_VERSIONS = ("/usr/lib/google-cloud-sdk/bin/kubectl.1.32", "/usr/bin/kubectl.1.32")


def kubectl_binary() -> str | None:
    for candidate in KUBECTL_VERSIONS:
        if Path(candidate).is_file():
            return candidate
    return shutil.which("kubectl")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: what a merge patch makes of ``target``."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _gv_key(group: str, version: str) -> str:
    return f"api/{version}" if group == "" else f"apis/{group}/{version}"


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.resources.load_bundled()
        for path in CRD_FILES:
            self.register_crd(yaml.safe_load(path.read_text()))
        self.fallback["get /openapi/v3"] << self._openapi_root
        self.fallback["get", re.compile(r"/openapi/v3/apis?/.+")] << self._openapi_group_version

    def register_crd(self, crd: dict[str, Any]) -> None:
        names, group = crd["spec"]["names"], crd["spec"]["group"]
        for version in crd["spec"]["versions"]:
            if not version.get("served", True):
                continue
            self.resources[f"{group}/{version['name']}/{names['plural']}"] = ResourceInfo(
                kind=names["kind"],
                singular=names.get("singular"),
                namespaced=crd["spec"].get("scope", "Namespaced") == "Namespaced",
                verbs=VERBS,
                shortnames=set(names.get("shortNames", [])),
                categories=set(names.get("categories", [])),
                subresources=set(version.get("subresources", {})),
            )

    def _next_version(self) -> str:
        return str(next(self._versions))

    def _stored(self, request: Any) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            return None
        raw: dict[str, Any] = self._objects[key].raw
        return raw

    async def _handle(self, request: Any) -> Any:
        if request.resource is not None and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.action == kmock.action.CREATE:
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
                meta["uid"] = str(uuid.uuid4())
                meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                meta["generation"] = 1
                meta["resourceVersion"] = self._next_version()
            elif request.action == kmock.action.UPDATE and request.name is not None:
                stored = self._stored(request)
                changes_spec = (
                    stored is not None
                    and "spec" in request.data
                    and request.subresource is None
                    and merge_patch(stored.get("spec"), request.data["spec"]) != stored.get("spec")
                )
                if changes_spec:
                    assert stored is not None
                    meta["generation"] = int(stored["metadata"].get("generation", 1)) + 1
                meta["resourceVersion"] = self._next_version()
        return await super()._handle(request)

    async def _serve_server_version(self, request: Any) -> dict[str, Any]:
        return {
            "major": "1",
            "minor": "32",
            "gitVersion": "v1.32.0-autoglm-emulator",
            "platform": "linux/amd64",
        }

    async def _serve_version(self, request: Any) -> dict[str, Any]:
        payload: dict[str, Any] = await super()._serve_version(request)
        payload["groupVersion"] = payload["groupVersion"].lstrip("/")  # the core group is "v1", not "/v1"
        for entry in payload["resources"]:
            if "/" in entry["name"]:  # a subresource: no short names (kubectl warns on every use)
                entry["shortNames"] = []
        return payload

    async def _serve_list(self, request: Any) -> dict[str, Any]:
        payload: dict[str, Any] = await super()._serve_list(request)
        resource = request.resource
        info = self.resources.get(resource, None)
        kind = getattr(info, "kind", None)
        api_version = f"{resource.group}/{resource.version}" if resource.group else resource.version
        return {
            "apiVersion": api_version,
            "kind": f"{kind}List" if kind else "List",
            **payload,
            "metadata": {"resourceVersion": self._next_version()},
        }

    async def _openapi_root(self, request: Any) -> dict[str, Any]:
        keys = {_gv_key(r.group, r.version) for r in self._get_resources()}
        return {"paths": {key: {"serverRelativeURL": f"/openapi/v3/{key}?hash=0"} for key in sorted(keys)}}

    async def _openapi_group_version(self, request: Any) -> dict[str, Any]:
        wanted = str(request.url.path).removeprefix("/openapi/v3/")
        paths = {}
        for resource in self._get_resources():
            key = _gv_key(resource.group, resource.version)
            info = self.resources.get(resource, None)
            if key != wanted or getattr(info, "kind", None) is None:
                continue
            gvk = {"group": resource.group, "version": resource.version, "kind": info.kind}
            patch = {
                "x-kubernetes-group-version-kind": gvk,
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": {"description": "OK"}},
            }
            scope = "namespaces/{namespace}/" if info.namespaced else ""
            paths[f"/{key}/{scope}{resource.plural}/{{name}}"] = {"patch": patch}
        return {
            "openapi": "3.0.0",
            "info": {"title": "AutoGLM's emulated cluster", "version": "v1"},
            "paths": paths,
        }


class EmulatedCluster:
    """The emulator on a loopback port, in a thread of its own; ``kubectl(...)`` runs the real client."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.kubeconfig = home / "kubeconfig"
        self.url = ""
        self.emulator: Emulator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> EmulatedCluster:
        ready = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            self._stop = asyncio.Event()
            async with Emulator() as emulator, kmock.Server(emulator) as server:
                self.emulator, self.url = emulator, str(server.url).rstrip("/")
                ready.set()
                await self._stop.wait()

        def main() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(serve())
            except BaseException as exc:  # reported by start()
                failure.append(exc)
                ready.set()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=main, name="k8s-emulator", daemon=True)
        self._thread.start()
        if not ready.wait(30) or failure:
            raise RuntimeError(f"the emulated cluster did not start: {failure[:1]}")
        self.kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emulated", "cluster": {"server": self.url}}],
                    "users": [{"name": "tester", "user": {"token": "emulated"}}],
                    "contexts": [{"name": "emulated", "context": {"cluster": "emulated", "user": "tester"}}],
                    "current-context": "emulated",
                }
            )
        )
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def kubectl(
        self, *args: str, stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        binary = kubectl_binary()
        assert binary is not None, "kubectl is not installed"
        command = [
            binary,
            "--kubeconfig",
            str(self.kubeconfig),
            "--cache-dir",
            str(self.home / "kube-cache"),
            *args,
        ]
        return subprocess.run(
            command, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )


@contextmanager
def emulated_cluster(home: Path) -> Iterator[EmulatedCluster]:
    cluster = EmulatedCluster(home).start()
    try:
        yield cluster
    finally:
        cluster.stop()
