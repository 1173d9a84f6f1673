"""The Kubernetes objects of the operator (``objects``, ``render``) and its serving backend's pure part
(``serving``). Light: the kserve and kubernetes SDKs are imported by the modules that build objects."""

#: Where a published revision lies in the artifact repository (the rendered examples' choice).
DEFAULT_ARTIFACT_URI = "s3://autoglm-artifacts/{namespace}/{model}/{revision}"
