"""``autoglm operator --kubeconfig``: kopf connects with the kubeconfig's credentials, as the
kubernetes client does (a bug: kopf's connection carried no token, because the client keeps it under
``api_key["BearerToken"]`` since release 30, and kopf's watches ran unauthenticated)."""

from __future__ import annotations

from pathlib import Path

import yaml
from kubernetes import client, config

from autoglm_operator.kube.operator import connection_info


def _configuration(tmp_path: Path, user: dict[str, str]) -> client.Configuration:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://10.0.0.1:6443", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }))  # fmt: skip
    return client.ApiClient(config.new_client_from_config(config_file=str(path)).configuration).configuration


def test_a_token_in_the_kubeconfig_is_kopfs_bearer_token(tmp_path: Path) -> None:
    info = connection_info(_configuration(tmp_path, {"token": "s3cret"}))
    assert info.server == "https://10.0.0.1:6443"
    assert info.as_http_headers() == {"Authorization": "Bearer s3cret"}
    assert info.insecure is True


def test_basic_auth_is_passed_on_and_no_credentials_send_none(tmp_path: Path) -> None:
    info = connection_info(_configuration(tmp_path, {"username": "admin", "password": "pw"}))
    assert info.as_http_headers()["Authorization"].startswith("Basic ")
    assert connection_info(_configuration(tmp_path, {})).as_http_headers() == {}
