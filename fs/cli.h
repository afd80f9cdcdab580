// The ckptfs command line (DESIGN.md §6): parses arguments and runs one
// command. Returns the process exit status: 0 success, 1 the command failed
// (message on stderr naming the file and the reason), 2 usage error.
#ifndef CKPTFS_FS_CLI_H_
#define CKPTFS_FS_CLI_H_

namespace ckptfs::fs {

int RunCli(int argc, char** argv);

}  // namespace ckptfs::fs

#endif  // CKPTFS_FS_CLI_H_
