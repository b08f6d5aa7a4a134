"""KVM access: the real binding (cffi over /dev/kvm) and the shared interface and error type."""
from .errors import KvmError

__all__ = ["KvmError"]
