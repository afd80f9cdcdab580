// The exception wall (core::CatchAll, core::CatchAndLog, fs::CallbackWall):
// whatever a callback or a thread's step throws becomes EIO and one error
// line, and a request is answered exactly once.
#include "fs/fuse_ops.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <new>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "fs/node_table.h"

namespace ckptfs::fs {
namespace {

// Collects the error lines logged while it lives.
class ErrorLines {
 public:
  ErrorLines() { core::SetErrorObserver(&ErrorLines::Add, this); }
  ~ErrorLines() { core::SetErrorObserver(nullptr, nullptr); }
  const std::vector<std::string>& lines() const { return lines_; }

 private:
  static void Add(void* self, const char* message) {
    static_cast<ErrorLines*>(self)->lines_.push_back(message);
  }
  std::vector<std::string> lines_;
};

// What real code throws: nlohmann's dump of bytes that are not UTF-8.
void DumpInvalidUtf8() { (void)nlohmann::json("CKPT+\xff\xfe").dump(); }

TEST(CatchAllTest, EveryExceptionBecomesEio) {
  struct Case {
    const char* name;
    void (*fn)();
    const char* expect;  // in the message
  };
  const Case cases[] = {
      {"std::exception", [] { throw std::runtime_error("disk on fire"); }, "lookup: disk on fire"},
      {"nlohmann", DumpInvalidUtf8, "type_error.316"},
      {"bad_alloc", [] { throw std::bad_alloc(); }, "lookup: out of memory"},
      {"unknown", [] { throw 42; }, "lookup: unknown exception"},
  };
  for (const Case& c : cases) {
    const core::Status s = core::CatchAll("lookup", c.fn);
    EXPECT_FALSE(s.ok()) << c.name;
    EXPECT_NE(s.message().find(c.expect), std::string::npos) << c.name << ": " << s.message();
    EXPECT_EQ(ToErrno(s), EIO) << c.name;
  }
  int ran = 0;
  EXPECT_TRUE(core::CatchAll("lookup", [&] { ++ran; }).ok());
  EXPECT_EQ(ran, 1);
}

TEST(CatchAndLogTest, LogsOneErrorAndGoesOn) {
  ErrorLines errors;
  EXPECT_FALSE(core::CatchAndLog("watcher", DumpInvalidUtf8));
  EXPECT_TRUE(core::CatchAndLog("watcher", [] {}));
  ASSERT_EQ(errors.lines().size(), 1u);
  EXPECT_EQ(errors.lines()[0].rfind("watcher: ", 0), 0u) << errors.lines()[0];
}

// A request whose body throws before replying gets the wall's one reply.
TEST(CallbackWallTest, ThrowBeforeReplyIsAnsweredOnce) {
  ErrorLines errors;
  for (void (*thrower)() : {+[] { throw std::runtime_error("x"); }, +[] { throw std::bad_alloc(); },
                            +[] { throw 42; }, &DumpInvalidUtf8}) {
    bool replied = false;
    int fails = 0;
    CallbackWall(
        "getattr", &replied, [&] { thrower(); }, [&] { ++fails; });
    EXPECT_EQ(fails, 1);
  }
  ASSERT_EQ(errors.lines().size(), 4u);
  for (const std::string& line : errors.lines()) EXPECT_EQ(line.rfind("getattr: ", 0), 0u) << line;
}

// A body that replied and then threw must not be answered twice (a second
// reply would free the request twice); the error is still logged.
TEST(CallbackWallTest, ThrowAfterReplyIsNotAnsweredAgain) {
  ErrorLines errors;
  bool replied = false;
  int replies = 0;
  CallbackWall(
      "lookup", &replied,
      [&] {
        replied = true;
        ++replies;
        throw std::runtime_error("after the reply");
      },
      [&] { ++replies; });
  EXPECT_EQ(replies, 1);
  ASSERT_EQ(errors.lines().size(), 1u);
  EXPECT_NE(errors.lines()[0].find("after the reply"), std::string::npos);
}

TEST(CallbackWallTest, BodyThatReturnsIsLeftAlone) {
  ErrorLines errors;
  bool replied = false;
  int fails = 0;
  CallbackWall(
      "read", &replied, [&] { replied = true; }, [&] { ++fails; });
  EXPECT_EQ(fails, 0);
  EXPECT_TRUE(errors.lines().empty());
}

}  // namespace
}  // namespace ckptfs::fs
