#!/usr/bin/env bash
# On the lent GPU machine, in one device call: install the carried wheels and this project, restore
# FlashInfer's just-in-time kernel cache, run the given command, and hand the cache back in $OUT
# (with whatever this run compiled) so the next call loads instead of compiling (60-90 s a kernel).
#
# Here, once: bash ../shared/gpu/fetch-wheels.sh && bash ../shared/gpu/fetch-wheels.sh --deps . jsonschema
#             mkdir -p .ficache && cp ../shared/gpu/ficache/*.tgz .ficache/
# Each call:  carry [".whl", ".ficache"], command `bash benchmarks/gpu_run.sh python3 -m pytest -q -m gpu`
# Afterwards: copy the returned ficache-*.tgz.* pieces into .ficache/ (replacing older ones), after
# repacking them without *.o files (the carry limit is 64 MiB, wheels included).
set -uo pipefail
# A machine still warm from the last call keeps /tmp/site: install only when the wheel set changed.
stamp=$(ls .whl | sha1sum | cut -c1-12)
if [ "$(cat /tmp/site/.wheels 2>/dev/null)" != "$stamp" ]; then
    rm -rf /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    echo "$stamp" > /tmp/site/.wheels
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
mkdir -p ~/.cache
for f in .ficache/*.tgz; do [ -e "$f" ] && tar xzf "$f" -C ~/.cache; done
if compgen -G ".ficache/ficache-*.tgz.*" >/dev/null; then cat .ficache/ficache-*.tgz.* | tar xzf - -C ~/.cache; fi
# Every cached kernel also as FlashInfer's ahead-of-time library (data/aot/<name>/<name>.so), which
# it loads without running ninja: so the cache may travel without its object files (strip *.o).
for so in ~/.cache/flashinfer/*/*/cached_ops/*/*.so; do
    [ -e "$so" ] || continue
    name=$(basename "$(dirname "$so")")
    [ "$(basename "$so")" = "$name.so" ] && mkdir -p "/tmp/site/flashinfer/data/aot/$name" && cp "$so" "/tmp/site/flashinfer/data/aot/$name/"
done
"$@"
rc=$?
if [ -n "${OUT:-}" ] && [ -d ~/.cache/flashinfer ]; then  # pieces under the 16 MiB a returned file may have
    tar czf - -C ~/.cache flashinfer | split -b 15m - "$OUT/ficache-$(date +%Y%m%d).tgz."
fi
exit $rc
