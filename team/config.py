"""Team mode settings, names and the error every command reports.

Settings (environment; `make team-up TEAM_MLFLOW_PORT=16000` works too):
    TEAM_DIR                    default <repo>/.onnxship/team
    TEAM_HOST                   address MLflow and Prefect bind to (default 127.0.0.1; PostgreSQL
                                always listens on 127.0.0.1 only)
    TEAM_PG_PORT                default 15432
    TEAM_MLFLOW_PORT            default 15000
    TEAM_PREFECT_PORT           default 14200
    TEAM_MLFLOW_WORKERS         uvicorn workers (default 1)
    TEAM_MLFLOW_ALLOWED_HOSTS   MLflow's --allowed-hosts (default: localhost and private IPs); set it
                                to the DNS name clients use when TEAM_HOST is not 127.0.0.1
    TEAM_ARTIFACTS_DESTINATION  default TEAM_DIR/mlflow-artifacts; e.g. s3://bucket/prefix (boto3 and
                                AWS_* / MLFLOW_S3_ENDPOINT_URL in the environment of `team up`)
    TEAM_PG_BIN                 default: the newest /usr/lib/postgresql/*/bin
    TEAM_START_TIMEOUT          seconds to wait for each service (default 240)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HOME = REPO_ROOT / ".onnxship" / "team"
DB_USER = "onnxship"
DATABASES = ("mlflow", "prefect")
SERVICES = ("postgres", "mlflow", "prefect")
PG_HOST = "127.0.0.1"
PORT_VARIABLES = {"postgres": "TEAM_PG_PORT", "mlflow": "TEAM_MLFLOW_PORT", "prefect": "TEAM_PREFECT_PORT"}


class TeamError(RuntimeError):
    """Something stops the stack from starting or stopping; the message says what and what to do."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _int_env(env, name: str, default: int) -> int:
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise TeamError(f"{name}={value!r}: expected an integer", 2) from None
    if not 0 < number < 65536:
        raise TeamError(f"{name}={value!r}: out of range", 2)
    return number


@dataclass(frozen=True)
class Config:
    home: Path = DEFAULT_HOME
    host: str = "127.0.0.1"
    pg_port: int = 15432
    mlflow_port: int = 15000
    prefect_port: int = 14200
    mlflow_workers: int = 1
    artifacts_destination: str | None = None
    mlflow_allowed_hosts: str | None = None
    pg_bin: Path | None = None
    start_timeout_s: float = 240.0

    @classmethod
    def from_env(cls, env=None) -> "Config":
        env = os.environ if env is None else env
        home = Path(env.get("TEAM_DIR") or DEFAULT_HOME).expanduser().absolute()
        return cls(
            home=home,
            host=env.get("TEAM_HOST") or "127.0.0.1",
            pg_port=_int_env(env, "TEAM_PG_PORT", 15432),
            mlflow_port=_int_env(env, "TEAM_MLFLOW_PORT", 15000),
            prefect_port=_int_env(env, "TEAM_PREFECT_PORT", 14200),
            mlflow_workers=_int_env(env, "TEAM_MLFLOW_WORKERS", 1),
            artifacts_destination=env.get("TEAM_ARTIFACTS_DESTINATION") or None,
            mlflow_allowed_hosts=env.get("TEAM_MLFLOW_ALLOWED_HOSTS") or None,
            pg_bin=Path(env["TEAM_PG_BIN"]) if env.get("TEAM_PG_BIN") else None,
            start_timeout_s=float(env.get("TEAM_START_TIMEOUT") or 240),
        )

    # where things live
    @property
    def pg_dir(self) -> Path:  # owned by the user PostgreSQL runs as
        return self.home / "postgres"

    @property
    def data_dir(self) -> Path:
        return self.pg_dir / "data"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def secrets(self) -> Path:
        return self.home / "secrets"

    @property
    def state_file(self) -> Path:
        return self.home / "state.json"

    @property
    def artifacts(self) -> str:
        return self.artifacts_destination or str(self.home / "mlflow-artifacts")

    # what clients use
    @property
    def public_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.public_host}:{self.mlflow_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.public_host}:{self.prefect_port}/api"

    def port(self, service: str) -> int:
        return {"postgres": self.pg_port, "mlflow": self.mlflow_port, "prefect": self.prefect_port}[service]

    def bind_host(self, service: str) -> str:
        return PG_HOST if service == "postgres" else self.host


def env_exports(config: Config) -> list[str]:
    return [f"export MLFLOW_TRACKING_URI={config.mlflow_url}", f"export PREFECT_API_URL={config.prefect_api_url}"]


