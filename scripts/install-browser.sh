#!/usr/bin/env bash
# Headless Chromium for the playground's browser test (Debian's package; Playwright
# drives it through executable_path, so no browser download is needed).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null
else
  echo "chromium not found and cannot be installed here: the browser test will be skipped" >&2
fi
