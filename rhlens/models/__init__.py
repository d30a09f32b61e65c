"""Models: loading into a ``TransformerBridge`` (:mod:`.load`), their files and hashes
(:mod:`.files`) and the packaged-model registry (:mod:`.packaged`)."""

from rhlens.deprecation import package_names
from rhlens.models import files, load, packaged
from rhlens.models.files import (
    cache_dir,
    file_sha256,
    folder_weights_sha256,
    read_gguf_header,
)
from rhlens.models.load import (
    DEVICE_MAPS,
    ModelShape,
    check_device,
    check_device_map,
    describe_model,
    hf_config,
    load_hf,
    load_model,
    load_tokenizer,
    model_shape,
    plan_device_map,
)
from rhlens.models.packaged import DEFAULT_MODEL, PACKAGED_MODELS, PackagedModel

__all__ = [
    "DEFAULT_MODEL",
    "DEVICE_MAPS",
    "PACKAGED_MODELS",
    "ModelShape",
    "PackagedModel",
    "cache_dir",
    "check_device",
    "check_device_map",
    "describe_model",
    "file_sha256",
    "folder_weights_sha256",
    "hf_config",
    "load_hf",
    "load_model",
    "load_tokenizer",
    "model_shape",
    "plan_device_map",
    "read_gguf_header",
]


# every other name the module rhlens.models had before it became a package
__getattr__ = package_names("rhlens.models", (load, files, packaged))
