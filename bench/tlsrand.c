// SPDX-License-Identifier: MIT
// tlsrand: random reads of BS bytes at queue depth QD on one libnbd
// connection for SECS seconds (bench/tls.sh). Any libnbd URI works,
// including nbds+unix:// with tls-psk-file= or tls-certificates= (local-file
// parameters are allowed here). Prints "IOPS IOS" on stdout.
//
//   cc -O2 -o tlsrand tlsrand.c $(pkg-config --cflags --libs libnbd)
//   tlsrand URI SECS QD BS
#include <libnbd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { kMaxQd = 256 };

struct slot {
  int busy;
  int failed;
};

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint64_t next_random(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int on_done(void* user_data, int* error) {
  struct slot* s = user_data;
  s->busy = 0;
  if (*error) s->failed = 1;
  return 1;  // retire the command
}

int main(int argc, char** argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: tlsrand URI SECS QD BS\n");
    return 2;
  }
  const double secs = atof(argv[2]);
  const int qd = atoi(argv[3]);
  const uint64_t bs = strtoull(argv[4], NULL, 10);
  if (qd < 1 || qd > kMaxQd || bs == 0 || secs <= 0) {
    fprintf(stderr, "tlsrand: bad arguments\n");
    return 2;
  }
  struct nbd_handle* h = nbd_create();
  if (!h || nbd_set_uri_allow_local_file(h, true) == -1 || nbd_connect_uri(h, argv[1]) == -1) {
    fprintf(stderr, "tlsrand: %s\n", nbd_get_error());
    return 1;
  }
  const int64_t size = nbd_get_size(h);
  if (size < (int64_t)bs) {
    fprintf(stderr, "tlsrand: export too small\n");
    return 1;
  }
  const uint64_t blocks = (uint64_t)size / bs;
  static struct slot slots[kMaxQd];
  char* buffers = malloc((size_t)qd * bs);
  if (!buffers) return 1;
  uint64_t ios = 0;
  const double start = now();
  const double end = start + secs;
  int stopping = 0;
  for (;;) {
    int in_flight = 0;
    for (int i = 0; i < qd; ++i) {
      if (slots[i].failed) {
        fprintf(stderr, "tlsrand: a read failed\n");
        return 1;
      }
      if (slots[i].busy) {
        ++in_flight;
        continue;
      }
      if (stopping) continue;
      nbd_completion_callback cb = {.callback = on_done, .user_data = &slots[i], .free = NULL};
      slots[i].busy = 1;
      if (nbd_aio_pread(h, buffers + (size_t)i * bs, bs, (next_random() % blocks) * bs, cb, 0) ==
          -1) {
        fprintf(stderr, "tlsrand: %s\n", nbd_get_error());
        return 1;
      }
      ++in_flight;
      ++ios;
    }
    if (stopping && in_flight == 0) break;
    if (nbd_poll(h, -1) == -1) {
      fprintf(stderr, "tlsrand: %s\n", nbd_get_error());
      return 1;
    }
    if (!stopping && now() >= end) stopping = 1;
  }
  const double elapsed = now() - start;
  nbd_shutdown(h, 0);
  nbd_close(h);
  free(buffers);
  printf("%.1f %llu\n", (double)ios / elapsed, (unsigned long long)ios);
  return 0;
}
