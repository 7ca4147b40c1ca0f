"""Storage folders mounted into kernels: backends, sharing, quotas and files."""

from .backends import DirectoryBackend, LoopbackBackend, StorageBackend
from .service import VFolderService

__all__ = ["DirectoryBackend", "LoopbackBackend", "StorageBackend", "VFolderService"]
