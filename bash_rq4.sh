#!/usr/bin/env bash
# Thin wrapper: bash bash_rq4.sh [--tiny|--wiki] [--only NAME] [--engine E] [--gpus N] (see scripts/rq4.sh)
exec bash "$(dirname "$0")/scripts/rq4.sh" "$@"
