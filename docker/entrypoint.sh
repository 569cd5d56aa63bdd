#!/bin/sh
# `docker run IMAGE --model-id /data/NAME ...` runs `embedrank serve` with TEI's arguments unchanged.
# Docker sets HOSTNAME to the container id, and the server reads HOSTNAME like TEI does, so bind to all
# interfaces unless the command line says otherwise (a later --hostname wins).
set -e
if [ "${1:-}" = "export" ]; then
    shift
    exec embedrank export --output /data "$@"
fi
exec embedrank serve --hostname 0.0.0.0 "$@"
