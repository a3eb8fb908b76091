#!/bin/sh
# llmesh container entrypoint (also what the network-namespace tests and bench run on
# the host, so containers and tests start services the same way).
#
#   entrypoint.sh scheduler|gateway|worker [FLAGS...]   run that service (flags as in
#                                                       `llmesh-<service> --help`; every
#                                                       flag also reads LLMESH_<SERVICE>_*)
#   entrypoint.sh healthcheck                           exit 0 if this container's service
#                                                       answers gRPC health SERVING
#   entrypoint.sh build-kernels                         compile the engine's native kernels
#                                                       into $LLMESH_KERNEL_CACHE (image build)
#
# A service writes its ready file ($LLMESH_RUN_DIR/ready.json) once SERVING; the
# healthcheck reads the address from it, so it follows whatever bind/advertise
# address the environment chose. `exec` keeps the service PID 1's direct replacement:
# SIGTERM from `docker stop` reaches it and it drains (NOT_SERVING, deregister).
set -eu

run_dir="${LLMESH_RUN_DIR:-/tmp/llmesh}"
ready_file="$run_dir/ready.json"
python="${LLMESH_ENTRYPOINT_PYTHON:-python}"

role="${1:-}"
[ "$#" -gt 0 ] && shift

case "$role" in
  scheduler) module=services.scheduler ;;
  gateway) module=gateway ;;
  worker) module=services.worker ;;
  healthcheck)
    exec "$python" -m services.cli.health --ready-file "$ready_file" "$@"
    ;;
  build-kernels)
    exec "$python" -c 'from services.worker.engine.kernels import library; print(library()._name)'
    ;;
  *)
    echo "usage: entrypoint.sh scheduler|gateway|worker [FLAGS...] | healthcheck | build-kernels" >&2
    echo "       (got: '${role}')" >&2
    exit 64
    ;;
esac

mkdir -p "$run_dir"
rm -f "$ready_file"
exec "$python" -m "$module" --ready-file "$ready_file" "$@"
