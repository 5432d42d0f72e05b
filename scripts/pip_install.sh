#!/usr/bin/env bash
# `pip install` that survives a flaky network: the Python 3.12 set alone downloads about 3 GB from
# PyPI (a CUDA torch with its nvidia-* and triton wheels), and one interrupted download used to fail
# all of CI. A failed install is retried only when pip's output shows a download fault; a resolver
# conflict or a build error fails at once. Finished downloads stay in pip's cache across attempts.
#
# Usage: scripts/pip_install.sh PATH/TO/pip [pip install arguments...]
# PIP_INSTALL_WAITS (seconds between the 5 attempts, 4 numbers) overrides the default waits.
set -uo pipefail

pip_bin="$1"
shift
read -r -a waits <<<"${PIP_INSTALL_WAITS:-30 90 180 300}"
network_fault='incomplete-download|NewConnectionError|Connection (interrupted|reset|aborted|broken)|ConnectionError|ProtocolError|Read ?timed ?out|ReadTimeoutError|IncompleteRead|Temporary failure in name resolution|network connectivity'

resume=()
if "$pip_bin" install --help 2>/dev/null | grep -q -- '--resume-retries'; then
    resume=(--resume-retries 10)
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for attempt in 1 2 3 4 5; do
    if "$pip_bin" install "${resume[@]}" "$@" 2>&1 | tee "$log"; then
        exit 0
    fi
    if ! grep -qE "$network_fault" "$log"; then
        echo "pip_install.sh: pip install failed for a reason other than the network; not retrying" >&2
        exit 1
    fi
    if ((attempt == 5)); then
        echo "pip_install.sh: downloads from the package index still fail after $attempt attempts" >&2
        exit 1
    fi
    wait_s="${waits[attempt - 1]}"
    echo "pip_install.sh: a download failed (attempt $attempt of 5); retrying in ${wait_s}s" >&2
    sleep "$wait_s"
done
