#!/usr/bin/env bash
# The team's MLflow tracking server: PostgreSQL as the backend store, S3 as the artifact store
# (proxied: clients upload and download through the server, so they need no S3 credentials), and
# MLflow's basic-auth app (users, passwords and per-experiment permissions in their own database).
#
# Everything comes from the environment; nothing secret is on the command line (where `ps` shows it)
# or in a file this script writes.
#
# Required:
#   MLFLOW_BACKEND_STORE_URI       postgresql+psycopg2://USER@HOST:5432/mlflow  (tracking data)
#   MLFLOW_AUTH_DATABASE_URI       postgresql+psycopg2://USER@HOST:5432/mlflow_auth  (users, permissions)
#   MLFLOW_ARTIFACTS_DESTINATION   s3://BUCKET/PREFIX  (artifacts of every run)
#   MLFLOW_FLASK_SERVER_SECRET_KEY random, the same on every replica (CSRF of the sign-up form)
#   PGPASSWORD                     the database password (libpq reads it), so the URIs carry none
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY  the artifact bucket's credentials (or an instance role)
# First start only (the admin user is created once, in the auth database):
#   MLFLOW_AUTH_ADMIN_PASSWORD     MLflow ships no default and refuses to start without one
# Optional:
#   MLFLOW_AUTH_ADMIN_USERNAME     default admin
#   MLFLOW_AUTH_DEFAULT_PERMISSION what a signed-in user may do with others' experiments: READ
#                                  (default), EDIT, MANAGE or NO_PERMISSIONS
#   MLFLOW_S3_ENDPOINT_URL         S3-compatible storage other than AWS (MinIO, Ceph, SeaweedFS)
#   MLFLOW_HOST (127.0.0.1), MLFLOW_PORT (5000), MLFLOW_WORKERS (4)
#   MLFLOW_ALLOWED_HOSTS           Host headers to accept (MLflow's default: localhost and private IPs);
#                                  set it to the server's DNS name when it is reached by one
#
# Serve it behind TLS (a reverse proxy or an ingress): basic auth sends passwords in every request.
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql+psycopg2://mlflow@db:5432/mlflow}"
: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI, e.g. postgresql+psycopg2://mlflow@db:5432/mlflow_auth}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://mlflow-artifacts/vlp}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (e.g. openssl rand -hex 32)}"

# The auth app reads its settings from an ini file only (MLFLOW_AUTH_CONFIG_PATH). Written here from
# the environment: it holds no secret (the password comes from PGPASSWORD; the admin password from
# MLFLOW_AUTH_ADMIN_PASSWORD, which MLflow reads itself). ConfigParser treats % as interpolation.
config_dir="$(mktemp -d "${TMPDIR:-/tmp}/mlflow-auth.XXXXXX")"
auth_uri="${MLFLOW_AUTH_DATABASE_URI//%/%%}"
cat > "${config_dir}/basic_auth.ini" <<EOF
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${auth_uri}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
export MLFLOW_AUTH_CONFIG_PATH="${config_dir}/basic_auth.ini"

# compose.yaml passes optional settings as empty strings: an empty endpoint would reach boto3 as one.
if [[ -z "${MLFLOW_S3_ENDPOINT_URL:-}" ]]; then
  unset MLFLOW_S3_ENDPOINT_URL
fi

args=(
  --app-name basic-auth
  --host "${MLFLOW_HOST:-127.0.0.1}"
  --port "${MLFLOW_PORT:-5000}"
  --workers "${MLFLOW_WORKERS:-4}"
  --serve-artifacts
)
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "${MLFLOW_ALLOWED_HOSTS}")
fi

# --backend-store-uri and --artifacts-destination are read from MLFLOW_BACKEND_STORE_URI and
# MLFLOW_ARTIFACTS_DESTINATION by the CLI itself (click envvars): the URIs stay off the command line.
export MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION
exec "${MLFLOW_BIN:-mlflow}" server "${args[@]}"
