#include <cstdio>

#include "fs/options.h"

namespace ckptfs::fs {

int RunMount(const Options& opt) {
  std::fprintf(stderr, "ckptfs: mount %s: not built yet\n", opt.source.c_str());
  return 1;
}

}  // namespace ckptfs::fs
