"""Operator tooling: repository, keys, bundle writer, publishing."""

from publisher._bundle_build import BuildOptions, build_bundle, generate_vectors
from publisher._keys import ROLES, generate_key, load_signer
from publisher._repo import Expiry, PublishResult, Repository

__all__ = [
    "ROLES",
    "BuildOptions",
    "Expiry",
    "PublishResult",
    "Repository",
    "build_bundle",
    "generate_key",
    "generate_vectors",
    "load_signer",
]
