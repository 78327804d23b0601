#!/bin/sh
# Rebuilds ../static/vendor.js from the pinned npm packages in package.json (needs Node and npm; pip users never run
# this: the built file is committed). Run from anywhere: sh src/hearthlm/server/ui/npm/build.sh
set -eu
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
npx esbuild vendor.js --bundle --minify --format=iife --global-name=vendor --target=es2020 \
  --legal-comments=eof --outfile=../static/vendor.js
ls -l ../static/vendor.js
