#!/usr/bin/env bash
# Thin wrapper: bash bash_rq2.sh [--tiny|--wiki] [--only NAME] [--engine E] [--gpus N] (see scripts/rq2.sh)
exec bash "$(dirname "$0")/scripts/rq2.sh" "$@"
