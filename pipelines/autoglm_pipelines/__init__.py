"""The compression pipeline: fetch, compress, calibrate, validate and publish, as Argo or local steps."""
