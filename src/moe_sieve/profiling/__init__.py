"""Routing profiler (recipe step 1) and its artifact."""

from .artifact import Profile, ProfileMismatchError
from .profiler import ProfileConfig, profile_model, run_profile
from .recorder import RoutingRecorder

__all__ = [
    "Profile",
    "ProfileConfig",
    "ProfileMismatchError",
    "RoutingRecorder",
    "profile_model",
    "run_profile",
]
