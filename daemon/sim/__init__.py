"""The simulated arm64 KVM host: our embedded default and test double (see host.py)."""
from .host import SimHost, load_profile, list_profiles, ProfileError

__all__ = ["SimHost", "load_profile", "list_profiles", "ProfileError"]
