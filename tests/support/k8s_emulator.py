"""A Kubernetes API on loopback for the operator's tests, driven by the real ``kubectl``.

kmock's ``KubernetesEmulator`` plus what kubectl and kopf need from a real API server
(``../shared/notes/testing-the-operator.md``):

- server-set metadata: ``uid``, ``creationTimestamp``, a ``resourceVersion`` bumped on every write,
  ``generation`` 1 on create and bumped when the spec changes (JSON merge patch semantics);
- ``/version`` reporting 1.32, so the ``kubectl`` dispatcher always runs the same client;
- an OpenAPI v3 document per group/version that declares ``fieldValidation`` on PATCH, so
  ``kubectl apply`` leaves validation to the server instead of failing to download a schema;
- list responses with their ``kind`` (``<Kind>List``) and ``apiVersion``, and Table responses built
  from the CRD's printer columns when kubectl asks for them (``kubectl get agm``);
- discovery of the core group as ``v1`` (kmock says ``/v1``) and without the short names kmock
  copies onto status subresources;
- ``/api/v1/namespaces`` parsed as the namespaces resource (kmock 0.8 reads it as a namespace
  prefix), so namespaces can be applied, listed and fetched;
- resources registered from CRD files (ours in ``crds/`` and the autoglm-crds chart, the upstream
  ones in ``../shared/schemas``), and the built-in ones kmock bundles;
- ``kubectl apply --server-side`` of a missing object creates it;
- JSON patches (kopf's finalizer patch tests ``/metadata/resourceVersion``): applied with the same
  server-set metadata, and a failed ``test`` or a path that does not exist answered 422, not 500;
- watches that start where the client's list ended (``?resourceVersion=N`` replays only the events
  after N, deletions included, from a per-resource log) and honour
  ``fieldSelector=metadata.name=...`` and ``labelSelector`` (equality terms), as kubectl and kopf
  expect; the DELETED event of an object carries a new resourceVersion.

``EmulatedCluster`` runs it in a thread with its own event loop, so tests call ``kubectl`` as a plain
blocking subprocess, with their own kubeconfig and discovery cache.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import functools
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
import jsonpatch
import yaml

from tests.support.crd_schemas import SCHEMAS

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import kmock
    from kmock import ResourceInfo
    from kmock._internal import aiobus
    from kmock._internal import parsing as kmock_parsing
    from kmock._internal.k8s import KubernetesError

_kmock_parse_path = kmock_parsing.parse_path


def _parse_path(path: str) -> Any:
    """kmock 0.8 reads ``/api/v1/namespaces[/NAME]`` as a namespace prefix with no resource after it
    (a 500 for any request to namespaces): the namespaces resource itself is parsed here. (``kubectl
    create namespace`` still fails: it sends protobuf, which kmock cannot read; ``apply`` sends JSON.)"""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (
        len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize"))
    ):
        name = parts[3] if len(parts) > 3 else None
        subresource = parts[4] if len(parts) > 4 else None
        return kmock_parsing.ParsedPath("", "v1", "namespaces", None, name, subresource)
    return _kmock_parse_path(path)


kmock_parsing.parse_path = _parse_path  # kmock is pinned below 0.9 in pyproject.toml

REPO = Path(__file__).resolve().parents[2]
CRD_FILES = (
    REPO / "crds" / "autoglm.io_autoglmmodels.yaml",
    SCHEMAS / "argo-workflows.argoproj.io_workflows.yaml",
    SCHEMAS / "argo-workflows.argoproj.io_workflowtemplates.yaml",
    SCHEMAS / "kserve.serving.kserve.io_inferenceservices.yaml",
    SCHEMAS / "kserve.serving.kserve.io_clusterservingruntimes.yaml",
)
#: kopf's peering resources (``kopf.dev/v1``) as the autoglm-crds chart installs them.
PEERING_CRDS = REPO / "charts" / "autoglm-crds" / "files" / "kopf.dev_peerings.yaml"
VERBS = {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}
#: The client every test runs (the /usr/bin/kubectl dispatcher picks one by the server's version).
KUBECTL_VERSIONS = ("/usr/lib/google-cloud-sdk/bin/kubectl.1.32", "/usr/bin/kubectl.1.32")


@functools.cache
def _crd(path: Path) -> dict[str, Any]:
    """A CRD file, parsed once per process (libyaml's parser where there is one: the upstream Argo and
    KServe CRDs are megabytes, seconds each for the pure-Python parser)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd: dict[str, Any] = yaml.load(path.read_text(), Loader=loader)  # a safe loader
    return crd


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


class PatchInvalidError(KubernetesError):  # type: ignore[misc]
    """A JSON patch whose ``test`` failed or whose path does not exist: 422, as the API server says."""

    status = 422
    reason = "Invalid"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@attrs.mutable(weakref_slot=True)
class LoggedBus(aiobus.Bus[Any]):  # type: ignore[misc]
    """kmock's event bus, also keeping every event it carried: a watch from a resourceVersion
    replays the events after it."""

    log: list[Any] = attrs.field(factory=list, init=False)

    async def put(self, *items: Any) -> None:
        self.log.extend(copy.deepcopy(item) for item in items)
        await super().put(*items)


def _version_of(event: dict[str, Any]) -> int:
    try:
        return int(event.get("object", {}).get("metadata", {}).get("resourceVersion", 0))
    except (TypeError, ValueError):
        return 0


def _selected(request: Any, obj: dict[str, Any]) -> bool:
    """Whether ``obj`` passes the request's ``fieldSelector`` and ``labelSelector`` (equality terms:
    ``a=b``, ``a==b``, ``a!=b``; fields metadata.name and metadata.namespace)."""
    meta = obj.get("metadata", {})
    fields = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace")}
    labels = meta.get("labels") or {}
    for param, values in (("fieldSelector", fields), ("labelSelector", labels)):
        for term in filter(None, str(request.params.get(param, "")).split(",")):
            negate = "!=" in term
            key, _, value = term.replace("!=", "=").replace("==", "=").partition("=")
            if not _:  # a bare key: the label exists
                if key.strip() not in values:
                    return False
                continue
            if (values.get(key.strip()) == value.strip()) == negate:
                return False
    return True


def _wants_table(request: Any) -> bool:
    return "as=Table" in str(request.headers.get("Accept", ""))


def _json_path(obj: Any, path: str) -> Any:
    """A printer column's value: a dotted path (``.status.canary.weight``), None where it is absent."""
    for part in path.strip(".").split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _cell(obj: dict[str, Any], column: dict[str, Any]) -> Any:
    """A printer column's cell; a date shown as its age, as the API server's table convertor does."""
    value = _json_path(obj, column["jsonPath"])
    if column["type"] != "date" or not isinstance(value, str):
        return value
    then = datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    return _human_duration(datetime.datetime.now(datetime.UTC) - then)


def _human_duration(age: datetime.timedelta) -> str:
    """Kubernetes' ``duration.HumanDuration`` for the ranges tests see: 42s, 3m12s, 45m, 5h, 3d."""
    seconds = max(int(age.total_seconds()), 0)
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    return f"{hours}h" if hours < 48 else f"{hours // 24}d"


def _gv_key(group: str, version: str) -> str:
    return f"api/{version}" if group == "" else f"apis/{group}/{version}"


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    #: (group, version, plural) -> the CRD's additionalPrinterColumns, for Table responses.
    _columns: dict[tuple[str, str, str], list[dict[str, Any]]] = attrs.field(factory=dict, init=False)
    #: Every API call by the bearer token that made it: {token: {(verb, group, resource, scope)}}.
    calls: collections.defaultdict[str, set[tuple[str, str, str, str]]] = attrs.field(
        factory=lambda: collections.defaultdict(set), init=False
    )

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._buses = collections.defaultdict(LoggedBus)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.resources.load_bundled()
        for path in CRD_FILES:
            self.register_crd(_crd(path))
        for crd in yaml.safe_load_all(PEERING_CRDS.read_text()):
            self.register_crd(crd)
        # Watches answer as JSON (kubectl's watch of a deletion refuses application/octet-stream),
        # ahead of kmock's own watch fallback.
        (
            (self.fallback**1)[kmock.action.WATCH]
            << kmock.headers({"Content-Type": "application/json"})
            << self._serve_watch
        )
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
            self._columns[(group, version["name"], names["plural"])] = version.get(
                "additionalPrinterColumns", []
            )

    async def _create_applied(self, request: Any, meta: dict[str, Any]) -> None:
        """``kubectl apply --server-side`` of a missing object creates it (the patch that follows
        applies the same fields again: no change)."""
        meta.update(
            name=request.name, uid=str(uuid.uuid4()), generation=1, resourceVersion=self._next_version(),
            creationTimestamp=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )  # fmt: skip
        if request.namespace is not None:
            meta["namespace"] = request.namespace
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            self._objects[key] = copy.deepcopy(request.data)
            await self._buses[request.resource].put({"type": "ADDED", "object": self._objects[key].raw})

    def _stamp_update(self, request: Any, stored: dict[str, Any], meta: dict[str, Any]) -> None:
        """A merge patch: a new resourceVersion, and the generation bumped when the spec changes."""
        changes_spec = (
            "spec" in request.data
            and request.subresource is None
            and merge_patch(stored.get("spec"), request.data["spec"]) != stored.get("spec")
        )
        if changes_spec:
            meta["generation"] = int(stored["metadata"].get("generation", 1)) + 1
        meta["resourceVersion"] = self._next_version()

    async def _serve_watch(self, request: Any) -> Any:
        """Events from the client's resourceVersion on (every current object as ADDED without one),
        filtered by name, namespace and the selectors; then the live ones."""
        yield b""
        bus = self._buses[request.resource]
        since = str(request.params.get("resourceVersion", "") or "0")
        async with self._lock:
            marker = await bus.mark()
            if since != "0":
                version = int(since) if since.isdigit() else 0
                events = [e for e in bus.log if _version_of(e) > version]
            else:
                events = [
                    {"type": "ADDED", "object": copy.deepcopy(obj.raw)}
                    for (resource, _, _), obj in self._objects.items()
                    if resource == request.resource and not obj.deleted
                ]
        try:
            for event in events:
                if self._watched(request, event):
                    yield event
            async for event in bus.stream(since=marker):
                if self._watched(request, event):
                    yield event
        finally:
            await bus.unmark(marker)

    @staticmethod
    def _watched(request: Any, event: dict[str, Any]) -> bool:
        obj = event.get("object", {})
        namespace = obj.get("metadata", {}).get("namespace")
        if request.namespace is not None and namespace != request.namespace:
            return False
        if request.name is not None and obj.get("metadata", {}).get("name") != request.name:
            return False
        return _selected(request, obj)

    def _audit(self, request: Any) -> None:
        """Record the call as RBAC sees it: (verb, API group, resource[/subresource], scope), by the
        caller's bearer token, so a test can compare what a client called with what its role allows."""
        if request.resource is None or request.resource.plural is None:
            return  # discovery, /version, /openapi: non-resource URLs every authenticated user may read
        method = str(request.method.value if hasattr(request.method, "value") else request.method).upper()
        if method == "GET":
            watching = str(request.params.get("watch", "")).lower() in ("true", "1")
            verb = "watch" if watching else ("get" if request.name else "list")
        else:
            verb = {"POST": "create", "PATCH": "patch", "PUT": "update"}.get(method, "")
            if method == "DELETE":
                verb = "delete" if request.name else "deletecollection"
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        token = str(request.headers.get("Authorization", "")).removeprefix("Bearer ").strip()
        call = (
            verb,
            request.resource.group or "",
            resource,
            "namespaced" if request.namespace else "cluster",
        )
        self.calls[token].add(call)

    def _next_version(self) -> str:
        return str(next(self._versions))

    def _stored(self, request: Any) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            return None
        raw: dict[str, Any] = self._objects[key].raw
        return raw

    async def _handle(self, request: Any) -> Any:
        self._audit(request)
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
                if stored is not None:
                    self._stamp_update(request, stored, meta)
                elif "apply-patch" in str(request.headers.get("Content-Type", "")):
                    await self._create_applied(request, meta)
        elif request.resource is not None and isinstance(request.data, list) and request.name is not None:
            stored = self._stored(request)  # a JSON patch
            if request.action == kmock.action.UPDATE and stored is not None:
                try:
                    patched = jsonpatch.apply_patch(stored, request.data, in_place=False)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                    raise PatchInvalidError(f"the JSON patch cannot be applied: {exc}") from exc
                extra: dict[str, Any] = {}
                if patched.get("spec") != stored.get("spec") and request.subresource is None:
                    extra["generation"] = int(stored["metadata"].get("generation", 1)) + 1
                extra["resourceVersion"] = self._next_version()
                request.data.extend(
                    {"op": "add", "path": f"/metadata/{key}", "value": value} for key, value in extra.items()
                )
        if request.action == kmock.action.DELETE and request.name is not None:
            stored = self._stored(request)
            if stored is not None:  # the DELETED (or deletionTimestamp) event's resourceVersion
                key = (request.resource, request.namespace, request.name)
                self._objects[key].patch({"metadata": {"resourceVersion": self._next_version()}})
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

    async def _serve_fetch(self, request: Any) -> dict[str, Any]:
        obj: dict[str, Any] = await super()._serve_fetch(request)
        return self._table(request, [obj]) if _wants_table(request) else obj

    async def _serve_list(self, request: Any) -> dict[str, Any]:
        payload: dict[str, Any] = await super()._serve_list(request)
        if _wants_table(request):
            return self._table(request, payload["items"])
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

    def _table(self, request: Any, objects: list[dict[str, Any]]) -> dict[str, Any]:
        """A ``meta.k8s.io/v1`` Table, as kubectl asks for to print ``get``: the Name column, then the
        CRD's printer columns (or Age, for a resource without any)."""
        resource = request.resource
        declared = self._columns.get((resource.group, resource.version, resource.plural)) or [
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
        ]
        definitions = [
            {"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}
        ]
        definitions += [
            {"name": c["name"], "type": c["type"], "format": c.get("format", ""),
             "description": c.get("description", ""), "priority": c.get("priority", 0)}
            for c in declared
        ]  # fmt: skip
        rows = [
            {
                "cells": [obj["metadata"]["name"], *(_cell(obj, c) for c in declared)],
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                },
            }
            for obj in objects
        ]
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": self._next_version()},
            "columnDefinitions": definitions,
            "rows": rows,
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
        self.home.mkdir(parents=True, exist_ok=True)
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

    def kubeconfig_for(self, token: str) -> Path:
        """A kubeconfig of this cluster for another user (its bearer token tells its calls apart)."""
        path = self.home / f"kubeconfig-{token}"
        config = yaml.safe_load(self.kubeconfig.read_text())
        config["users"] = [{"name": "tester", "user": {"token": token}}]
        path.write_text(yaml.safe_dump(config))
        return path

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


def namespace(name: str) -> str:
    return f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n"


@contextmanager
def emulated_cluster_with(home: Path, *documents: str) -> Iterator[EmulatedCluster]:
    """The emulated cluster with ``documents`` (YAML: namespaces, peering objects) applied first."""
    with emulated_cluster(home) as cluster:
        for document in documents:
            done = cluster.kubectl("apply", "-f", "-", stdin=document)
            assert done.returncode == 0, done.stderr
        yield cluster
