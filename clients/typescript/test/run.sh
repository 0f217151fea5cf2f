#!/usr/bin/env bash
# Check the formatting, build the client and its tests (strict tsc), then run them
# with Node's own test runner against real servers; a skipped or todo test fails
# the run.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf dist
../../node_modules/.bin/prettier --check --log-level warn src test bench
../../node_modules/.bin/tsc -p .
node --test --test-concurrency=1 \
  --test-reporter=spec --test-reporter-destination=stdout \
  --test-reporter=tap --test-reporter-destination=dist/results.tap \
  dist/test/*.test.js
if ! grep -q '^# skipped 0$' dist/results.tap || ! grep -q '^# todo 0$' dist/results.tap; then
  echo "TypeScript tests: a test was skipped or left as todo; none may be" >&2
  exit 1
fi
echo "TypeScript tests: $(grep '^# pass' dist/results.tap | cut -d' ' -f3) passed"
