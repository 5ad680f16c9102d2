#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# nbdinfo --list / --json against two exports: a writable one with a
# description and a read-only one (size not a multiple of 4096) without a description.
source "$(dirname "$0")/functions.sh"
requires nbdinfo jq

sock=$tmpdir/nbd.sock
make_pattern_image "$tmpdir/disk0.img" 16M
truncate -s 1000448 "$tmpdir/ro.img"

start_fleeced \
    --export "name=disk0,file=$tmpdir/disk0.img,writable=on,description=Writable test disk" \
    --export "name=ro,file=$tmpdir/ro.img,writable=off" \
    --listen "unix:$sock"

# ---- nbdinfo --list, literal text (socket path replaced by SOCK)
bounded 30 nbdinfo --list "nbd+unix:///?socket=$sock" >"$tmpdir/list.raw"
sed "s|$sock|SOCK|g" "$tmpdir/list.raw" >"$tmpdir/list.out"
tab=$'\t'
cat >"$tmpdir/list.expected" <<EOT
protocol: newstyle-fixed without TLS, using structured packets
export="disk0":
${tab}description: Writable test disk
${tab}export-size: 16777216 (16M)
${tab}uri: nbd+unix:///disk0?socket=SOCK
${tab}contexts:
${tab}${tab}base:allocation
${tab}is_rotational: false
${tab}is_read_only: false
${tab}can_cache: true
${tab}can_df: true
${tab}can_fast_zero: true
${tab}can_flush: true
${tab}can_fua: true
${tab}can_multi_conn: true
${tab}can_trim: true
${tab}can_zero: true
${tab}block_size_minimum: 1
${tab}block_size_preferred: 4096
${tab}block_size_maximum: 33554432
export="ro":
${tab}export-size: 1000448 (977K)
${tab}uri: nbd+unix:///ro?socket=SOCK
${tab}contexts:
${tab}${tab}base:allocation
${tab}is_rotational: false
${tab}is_read_only: true
${tab}can_cache: true
${tab}can_df: true
${tab}can_fast_zero: false
${tab}can_flush: true
${tab}can_fua: true
${tab}can_multi_conn: true
${tab}can_trim: false
${tab}can_zero: false
${tab}block_size_minimum: 1
${tab}block_size_preferred: 4096
${tab}block_size_maximum: 33554432
EOT
expect_file_eq "$tmpdir/list.out" "$tmpdir/list.expected" "nbdinfo --list output"

# ---- nbdinfo --json per export, selected fields compared as literal JSON
fields='{name: .["export-name"], size: .["export-size"],
  description: (.description // "(none)"),
  is_read_only, is_rotational, can_flush, can_fua, can_multi_conn,
  can_trim, can_zero, can_fast_zero, can_df, can_cache,
  min: .block_size_minimum, pref: .block_size_preferred,
  max: .block_size_maximum, contexts}'

json_of() {
    bounded 30 nbdinfo --json "$(nbd_unix_uri "$1" "$sock")" >"$tmpdir/$1.json"
    jq -e '.protocol == "newstyle-fixed" and .TLS == false and .structured == true
           and (.exports | length) == 1' "$tmpdir/$1.json" >/dev/null ||
        fail "$1: unexpected protocol fields in $(cat "$tmpdir/$1.json")"
    jq -c ".exports[0] | $fields" "$tmpdir/$1.json"
}

expect_eq "$(json_of disk0)" \
'{"name":"disk0","size":16777216,"description":"Writable test disk","is_read_only":false,"is_rotational":false,"can_flush":true,"can_fua":true,"can_multi_conn":true,"can_trim":true,"can_zero":true,"can_fast_zero":true,"can_df":true,"can_cache":true,"min":1,"pref":4096,"max":33554432,"contexts":["base:allocation"]}' \
    "nbdinfo --json disk0"

expect_eq "$(json_of ro)" \
'{"name":"ro","size":1000448,"description":"(none)","is_read_only":true,"is_rotational":false,"can_flush":true,"can_fua":true,"can_multi_conn":true,"can_trim":false,"can_zero":false,"can_fast_zero":false,"can_df":true,"can_cache":true,"min":1,"pref":4096,"max":33554432,"contexts":["base:allocation"]}' \
    "nbdinfo --json ro"

# ---- single-value queries (exit 0 = true, 2 = false)
expect_eq "$(bounded 30 nbdinfo --size "$(nbd_unix_uri ro "$sock")")" 1000448 "nbdinfo --size ro"
expect_status 0 "disk0 can trim" bounded 30 nbdinfo --can trim "$(nbd_unix_uri disk0 "$sock")"
expect_status 2 "disk0 is not read-only" bounded 30 nbdinfo --is read-only "$(nbd_unix_uri disk0 "$sock")"
expect_status 0 "ro is read-only" bounded 30 nbdinfo --is read-only "$(nbd_unix_uri ro "$sock")"
expect_status 2 "ro cannot zero" bounded 30 nbdinfo --can zero "$(nbd_unix_uri ro "$sock")"

# ---- an unknown export is refused (NBD_REP_ERR_UNKNOWN), server carries on
if bounded 30 nbdinfo "$(nbd_unix_uri nosuch "$sock")" >"$tmpdir/nosuch.out" 2>&1; then
    fail "nbdinfo on an unknown export succeeded"
fi
grep -qi 'unknown\|not found\|not available\|server replied with error' "$tmpdir/nosuch.out" ||
    fail "unknown export: unexpected message: $(cat "$tmpdir/nosuch.out")"
fleeced_alive "$fleeced_pid" || fail "fleeced died"
echo "PASS: $test_name"
