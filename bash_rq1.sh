#!/usr/bin/env bash
# Thin wrapper: bash bash_rq1.sh [--tiny|--wiki] [--only NAME] [--engine E] [--gpus N] (see scripts/rq1.sh)
exec bash "$(dirname "$0")/scripts/rq1.sh" "$@"
