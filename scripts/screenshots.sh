#!/usr/bin/env bash
# Make the UI's screenshots anew (desktop and phone), as docs/ui.md shows them: the crawler test
# writes them to artifacts/screenshots/ while it visits every page of a realistic site.
set -euo pipefail
cd "$(dirname "$0")/.."
exec ./scripts/test.sh tests/e2e/test_ui_crawl.py tests/e2e/test_browser.py tests/e2e/test_experiments_ui.py \
  tests/e2e/test_jupyterlab.py -q "$@"
