#!/usr/bin/env bash
# Thin wrapper: bash bash_rq3.sh [--tiny|--wiki] [--only NAME] [--engine E] [--gpus N] (see scripts/rq3.sh)
exec bash "$(dirname "$0")/scripts/rq3.sh" "$@"
