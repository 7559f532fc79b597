"""The MLflow tracker (``tracking=mlflow``, the default): a run per job, a parent run per sweep.

Local use needs no server: an SQLite store under ``tracking.dir`` (created once, under a file lock,
however many processes start at the same moment). For several machines, point every worker at one
``mlflow server`` with ``tracking.uri=http://…``.
"""

import logging
import os

from framework.hookspecs import hookimpl
from plugins.mlflow.store import MLflowOptions
from plugins.mlflow.tracker import MLflowTracker

# MLflow draws a progress bar for every artifact transfer: one per job in a sweep's log. Off,
# unless the user asks for them.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Its system-metrics sampler announces every start and stop at INFO: two lines per job.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


@hookimpl
def register_trackers(register):
    register("mlflow", MLflowTracker, MLflowOptions)
