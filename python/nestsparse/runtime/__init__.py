"""Rerouting under a deadline: stages, latency profiles, the rerouting executor and QoS measurement.

- stages.py: where a model can switch level (checkpoints before residual blocks or layers);
- profile.py: per segment and level, the measured time (JSON round trip, moving estimate);
- executor.py: runs the model with a policy (static, choose-once, reroute) under a deadline;
- qos.py: many inferences per policy under load, the metrics, table and plot;
- timing.py: the one way the library times a call.

The load scenarios and the ``qos`` command are applications: nestsparse.apps.scenarios, nestsparse.apps.qos.
"""

from .executor import POLICIES, Inference, ReroutingExecutor
from .profile import PROFILE_FORMAT, LatencyProfile, ProfileError
from .qos import QosResult, checkpoint_cost, deadline_from, parse_deadline, plot_latency_cdf, qos_table, run_qos
from .stages import auto_stages, check_stages
from .timing import median_time

__all__ = [
    "auto_stages",
    "check_stages",
    "LatencyProfile",
    "ProfileError",
    "PROFILE_FORMAT",
    "ReroutingExecutor",
    "Inference",
    "POLICIES",
    "QosResult",
    "run_qos",
    "parse_deadline",
    "deadline_from",
    "qos_table",
    "plot_latency_cdf",
    "checkpoint_cost",
    "median_time",
]
