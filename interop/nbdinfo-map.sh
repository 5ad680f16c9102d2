#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# nbdinfo --map / --map --totals (base:allocation) on sparse raw images with
# data at known 4 KiB-aligned offsets; output compared to literal text.
source "$(dirname "$0")/functions.sh"
requires nbdinfo

sock=$tmpdir/nbd.sock
# a.img: 8 MiB, data islands at 0, 1M, 3M+8k, and the last 4k
make_pattern_image "$tmpdir/a.img" 8M 0:64k 1M:4k 3153920:12k 8384512:4k
# b.img: 4 MiB + 4k, a hole first, data in the middle and up to the end
make_pattern_image "$tmpdir/b.img" 4198400 2M:1M 3M:1028k
# c.img: 2 MiB, all hole
truncate -s 2M "$tmpdir/c.img"
# huge.img: 6 GiB sparse, data at 5 GiB and in the last 4k (extents > 4 GiB)
make_pattern_image "$tmpdir/huge.img" 6G 5G:4k 6442446848:4k
# odd.img: 1000001 bytes (not a multiple of 512), data in the last block
truncate -s 1000001 "$tmpdir/odd.img"
printf 'tail' | dd of="$tmpdir/odd.img" bs=1 seek=999997 conv=notrunc status=none

start_fleeced \
    --export "name=a,file=$tmpdir/a.img,writable=on" \
    --export "name=a-ro,file=$tmpdir/a.img" \
    --export "name=b,file=$tmpdir/b.img" \
    --export "name=c,file=$tmpdir/c.img" \
    --export "name=huge,file=$tmpdir/huge.img" \
    --export "name=odd,file=$tmpdir/odd.img" \
    --listen "unix:$sock"

check_map() {
    local export=$1 opt=$2
    bounded 30 nbdinfo $opt "$(nbd_unix_uri "$export" "$sock")" >"$tmpdir/map.out" ||
        fail "nbdinfo $opt $export failed"
    cat >"$tmpdir/map.expected"
    expect_file_eq "$tmpdir/map.out" "$tmpdir/map.expected" "nbdinfo $opt $export"
}

for e in a a-ro; do
check_map $e --map <<'EOT'
         0       65536    0  data
     65536      983040    3  hole,zero
   1048576        4096    0  data
   1052672     2101248    3  hole,zero
   3153920       12288    0  data
   3166208     5218304    3  hole,zero
   8384512        4096    0  data
EOT
check_map $e '--map --totals' <<'EOT'
     86016   1.0%   0 data
   8302592  99.0%   3 hole,zero
EOT
done

check_map b --map <<'EOT'
         0     2097152    3  hole,zero
   2097152     2101248    0  data
EOT
check_map b '--map --totals' <<'EOT'
   2101248  50.0%   0 data
   2097152  50.0%   3 hole,zero
EOT

check_map c --map <<'EOT'
         0     2097152    3  hole,zero
EOT
check_map c '--map --totals' <<'EOT'
   2097152 100.0%   3 hole,zero
EOT

check_map huge --map <<'EOT'
         0  5368709120    3  hole,zero
5368709120        4096    0  data
5368713216  1073733632    3  hole,zero
6442446848        4096    0  data
EOT
check_map huge '--map --totals' <<'EOT'
      8192   0.0%   0 data
6442442752 100.0%   3 hole,zero
EOT

check_map odd --map <<'EOT'
         0      999424    3  hole,zero
    999424         577    0  data
EOT

# explicit context name gives the same answer
check_map b --map=base:allocation <<'EOT'
         0     2097152    3  hole,zero
   2097152     2101248    0  data
EOT

# a context the server does not offer is an error for nbdinfo
if bounded 30 nbdinfo --map=qemu:dirty-bitmap:nope "$(nbd_unix_uri a "$sock")" \
        >"$tmpdir/bad.out" 2>&1; then
    fail "nbdinfo --map=qemu:dirty-bitmap:nope succeeded: $(cat "$tmpdir/bad.out")"
fi

# the image files themselves were not touched by mapping
expect_eq "$(du -k "$tmpdir/c.img" | cut -f1)" 0 "c.img stays unallocated"
expect_eq "$(du -k "$tmpdir/huge.img" | cut -f1)" 8 "huge.img stays sparse"
fleeced_alive "$fleeced_pid" || fail "fleeced died"
echo "PASS: $test_name"
