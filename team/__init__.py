"""Team mode: one PostgreSQL, an MLflow tracking server and a Prefect server on this machine.

    make team-up       # python -m team up: start what is not running, print the variables to export
    make team-down     # python -m team down: stop them by PID (the data stays)
    make team-status   # python -m team status
    eval "$(make -s team-env)"   # export MLFLOW_TRACKING_URI and PREFECT_API_URL in this shell

Everything lives under `TEAM_DIR` (default `.onnxship/team/`): the PostgreSQL cluster, the MLflow
artifact directory the tracking server serves over HTTP, logs, the generated database password and
the PIDs. See `team/stack.py` and the README section "Team mode".
"""
