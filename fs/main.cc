// The only main of ckptfs: the daemon and every CLI command.
#include "fs/cli.h"

int main(int argc, char** argv) { return ckptfs::fs::RunCli(argc, argv); }
