#!/usr/bin/env bash
# expect_failure.sh MIN_MATCHES PATTERN -- COMMAND...
# Passes when COMMAND exits non-zero and its output holds PATTERN (grep -E) at least
# MIN_MATCHES times: a failure on one rank must end every rank, with the message.
set -u
min="$1"; pattern="$2"; shift 3
out="$("$@" 2>&1)"; rc=$?
printf '%s\n' "$out"
n=$(printf '%s\n' "$out" | grep -cE "$pattern")
if [ "$rc" -eq 0 ]; then echo "expect_failure: exit status 0, wanted non-zero" >&2; exit 1; fi
if [ "$n" -lt "$min" ]; then
  echo "expect_failure: '$pattern' seen $n times, wanted at least $min" >&2; exit 1
fi
echo "expect_failure: exit status $rc, '$pattern' seen $n times"
