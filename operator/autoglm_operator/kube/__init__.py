"""The Kubernetes objects of the operator (``objects``, ``render``) and its serving backend's pure part
(``serving``). Light: the kserve and kubernetes SDKs are imported by the modules that build objects."""

#: Where a published revision lies in the artifact repository (the rendered examples' choice).
DEFAULT_ARTIFACT_URI = "s3://autoglm-artifacts/{namespace}/{model}/{revision}"
#: Argo's default artifact repository, where output artifacts reported by their key alone lie.
DEFAULT_ARTIFACT_REPOSITORY = "s3://autoglm-artifacts"
#: PromQL matchers selecting one target's servers beside the model and revision: the ``target`` label
#: every ``autoglm serve`` exports (the runtime sets it from the pod's ``autoglm.io/target`` label).
DEFAULT_TARGET_SELECTOR = 'target="{target}"'
