#!/usr/bin/env bash
# `make deploy`: register the deployments of prefect.yaml against PREFECT_API_URL (environment or Prefect
# profile), creating the process work pool `i2l-process` first if it is missing. Extra arguments go to
# `prefect deploy` (default: --all), e.g. `infra/prefect/deploy.sh --name evaluate`.
set -euo pipefail
cd "$(dirname "$0")/../.."
api_url=$(python -c 'from prefect.settings import PREFECT_API_URL; print(PREFECT_API_URL.value() or "")')
if [ -z "$api_url" ]; then
  echo "deploy: PREFECT_API_URL is not set: start a server (prefect server start) and" \
       "export PREFECT_API_URL=http://127.0.0.1:4200/api, or set it in your Prefect profile" >&2
  exit 2
fi
pool=i2l-process
prefect work-pool inspect "$pool" >/dev/null 2>&1 || prefect work-pool create "$pool" --type process
if [ $# -eq 0 ]; then set -- --all; fi
prefect --no-prompt deploy "$@"
echo "deployments registered at $api_url; run them with a worker here: prefect worker start --pool $pool"
