"""The ``autoglm.io/v1alpha1`` API: the single source of the CRD, its rules and its docs."""

from autoglm_api.base import API_VERSION, GROUP, KIND, PLURAL, VERSION, ApiModel
from autoglm_api.cel import CelRule
from autoglm_api.resource import AutoGLMModel, ObjectMeta
from autoglm_api.spec import AutoGLMModelSpec
from autoglm_api.status import AutoGLMModelStatus, Condition

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "ApiModel",
    "AutoGLMModel",
    "AutoGLMModelSpec",
    "AutoGLMModelStatus",
    "CelRule",
    "Condition",
    "ObjectMeta",
]
