// Helpers for tests that build small source trees on disk.
#ifndef CKPTFS_TESTS_TEST_UTIL_H_
#define CKPTFS_TESTS_TEST_UTIL_H_

#include <string>

namespace ckptfs::testing {

// A fresh directory under $TMPDIR, removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Creates parent directories as needed.
void WriteFile(const std::string& path, const std::string& content);
void MakeDirs(const std::string& path);
void SetMtime(const std::string& path, double unixtime);
std::string ReadFile(const std::string& path);
void CopyFile(const std::string& from, const std::string& to);
void RemoveTree(const std::string& path);

}  // namespace ckptfs::testing

#endif  // CKPTFS_TESTS_TEST_UTIL_H_
