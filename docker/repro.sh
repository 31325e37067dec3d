#!/bin/sh
# The compose `pipeline` service: the whole `dvc repro` in the persistent workspace $PIPELINE_WORKDIR (a
# named volume, default /work). The code and configuration come from the image ($PIPELINE_SOURCE, default
# /app) and are refreshed on every run; the outputs (data/, models/, results/, metrics/), dvc.lock and
# .dvc/ (DVC's cache) stay in the volume, so a second `up` re-runs only what changed and
# `docker compose down` keeps everything (`down -v` deletes the volumes). The image is not a git checkout:
# DVC runs without an SCM here. $DVC_REPRO_ARGS is passed to `dvc repro` (e.g. `--dry`, `-f`).
set -eu
src="${PIPELINE_SOURCE:-/app}"
work="${PIPELINE_WORKDIR:-/work}"
mkdir -p "$work"
cd "$work"
rm -rf pipeline configs
cp -R "$src/pipeline" "$src/configs" "$src/dvc.yaml" "$src/params.yaml" "$src/pyproject.toml" "$work"/
if [ -f "$src/.dvcignore" ]; then cp "$src/.dvcignore" "$work"/; fi
[ -d .dvc ] || dvc init --no-scm -q
# shellcheck disable=SC2086  # word splitting of the extra arguments is wanted
dvc repro ${DVC_REPRO_ARGS:-}
dvc metrics show
