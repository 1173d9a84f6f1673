"""The Kubernetes objects of the operator (``objects``, ``render``) and its serving backend's pure part
(``serving``). Light: the kserve and kubernetes SDKs are imported by the modules that build objects."""

#: Where a published revision lies in the artifact repository (the rendered examples' choice).
DEFAULT_ARTIFACT_URI = "s3://autoglm-artifacts/{namespace}/{model}/{revision}"
#: Argo's default artifact repository, where output artifacts reported by their key alone lie.
DEFAULT_ARTIFACT_REPOSITORY = "s3://autoglm-artifacts"
#: PromQL matchers selecting one target's servers (the pods' labels, as a PodMonitor keeps them).
DEFAULT_TARGET_SELECTOR = 'autoglm_io_model="{model}",autoglm_io_target="{target}"'
