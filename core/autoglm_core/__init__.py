"""What pipelines, the model server and the operator share, without torch: URIs and their
resolution, file digests and canonical hashing, revision ids, the model card, cache locations,
energy metering and the audit ledger."""
