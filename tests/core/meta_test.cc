#include "core/meta.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>

#include "test_util.h"

namespace ckptfs::core {
namespace {

TEST(MetaTest, SpeechBrainYamlTypesScalars) {
  Result<Meta> m = ParseSpeechBrainYaml(
      "# yamllint disable\nend-of-epoch: true\nloss: 1.5e-1\nepoch: 29\nname: run-a\n"
      "quoted: '3'\nunixtime: 1722533035.9243808\n",
      "CKPT.yaml");
  ASSERT_TRUE(m.ok()) << m.status().message();
  EXPECT_EQ(m->Find("end-of-epoch")->type, MetaType::kBool);
  EXPECT_EQ(*m->Number("loss"), 0.15);
  EXPECT_EQ(*m->Number("epoch"), 29);
  EXPECT_EQ(m->Find("name")->type, MetaType::kString);
  EXPECT_EQ(m->Find("quoted")->type, MetaType::kString);
  EXPECT_DOUBLE_EQ(*m->Number("unixtime"), 1722533035.9243808);
}

TEST(MetaTest, SpeechBrainYamlSkipsNestedAndPythonTags) {
  Result<Meta> m = ParseSpeechBrainYaml(
      "loss: 0.5\nnested: {a: 1}\nlist: [1, 2]\nobj: !!python/object:foo.Bar {x: 1}\n"
      "tuple: !!python/tuple [1, 2]\nnothing: null\n",
      "CKPT.yaml");
  ASSERT_TRUE(m.ok()) << m.status().message();
  EXPECT_EQ(m->entries.size(), 1u);
  EXPECT_EQ(m->skipped.size(), 5u);
}

TEST(MetaTest, SpeechBrainYamlErrorsNameTheFile) {
  struct Case {
    const char* text;
  } cases[] = {
      {"loss: 1\n\n\n@ Resize shaope (N,M,seq){"},
      {"[1, 2, 3]\n"},
      {"a: [unclosed\n"},
      {"\x01\x02\x03: \xff\xfe"},
  };
  for (const Case& c : cases) {
    Result<Meta> m = ParseSpeechBrainYaml(c.text, "/x/CKPT+1/CKPT.yaml");
    EXPECT_FALSE(m.ok()) << c.text;
    if (!m.ok()) {
      EXPECT_NE(m.status().message().find("/x/CKPT+1/CKPT.yaml"), std::string::npos);
    }
  }
}

TEST(MetaTest, NativeJson) {
  Result<Meta> m = ParseNativeJson(R"({"loss": 0.25, "tag": "full", "ok": false, "x": [1]})", "m");
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(*m->Number("loss"), 0.25);
  EXPECT_EQ(m->Find("tag")->text, "full");
  EXPECT_EQ(m->Find("ok")->type, MetaType::kBool);
  EXPECT_EQ(m->skipped, std::vector<std::string>{"x"});
  EXPECT_FALSE(ParseNativeJson("[1]", "m").ok());
  EXPECT_FALSE(ParseNativeJson("{", "m").ok());
}

TEST(MetaTest, TrainerStateTakesEvalMetricsAtGlobalStep) {
  const char* text = R"({"global_step": 200, "epoch": 2.0, "log_history": [
      {"step": 100, "eval_loss": 0.9},
      {"step": 200, "loss": 0.3, "learning_rate": 1e-5},
      {"step": 200, "eval_loss": 0.5, "eval_wer": 0.25}]})";
  Result<Meta> m = ParseTrainerState(text, "trainer_state.json");
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(*m->Number("global_step"), 200);
  EXPECT_EQ(*m->Number("epoch"), 2.0);
  EXPECT_EQ(*m->Number("eval_loss"), 0.5);
  EXPECT_EQ(*m->Number("eval_wer"), 0.25);
  EXPECT_EQ(m->Find("loss"), nullptr);
  EXPECT_FALSE(ParseTrainerState(R"({"epoch": 1})", "t").ok());
}

// What yaml.safe_load (PyYAML 6.0, SpeechBrain's reader) does with text
// around the document, checked by hand with /usr/bin/python3 and, where
// PyYAML is installed, checked again by the test itself.
struct StreamCase {
  const char* text;
  bool pyyaml_accepts;
};
const StreamCase kStreamCases[] = {
    {"loss: 1\n...\n", true},
    {"loss: 1\n...\n...\n", true},
    {"loss: 1\n... # c\n", true},
    {"loss: 1\n...\n\n   \n# a comment\n", true},
    {"loss: 1\r\n...\r\n# x\r\n", true},
    {"---\nloss: 1\n", true},
    {"%YAML 1.1\n---\nloss: 1\n", true},
    {"# c\n\n%YAML 1.1\n%TAG !x! tag:x,2000:\n--- \nloss: 1\n", true},
    {"\xEF\xBB\xBF---\nloss: 1\n...\n", true},
    {"--- # x\n...\n", true},
    {"a: |\n  text\n  ...\n  more\n", true},
    {"a: [foo\n%bar]\n", true},
    {"loss: 1\n  more\n", true},
    {"loss: 1\n...\ngarbage text\n", false},
    {"loss: 1\n...\nfoo: 2\n", false},
    {"loss: 1\n...\n  indented: 3\n", false},
    {"loss: 1\r...\rx\r", false},
    {"loss: 1\xE2\x80\xA8...\xE2\x80\xA8garbage\n", false},
    {"loss: 1\n...\n\t# c\n", false},
    {"loss: 1\n...\t# c\n", false},
    {"loss: 1\n...\n%YAML 1.1\n", false},
    {"loss: 1\n---\nother: 2\n", false},
    {"loss: 1\n...\n---\nother: 2\n", false},
    {"loss: 1\n---\n", false},
    {"loss: 1\n--- \n", false},
    {"loss: 1\n---\n...\n", false},
    {"...\nloss: 1\n", false},
    {"...\n", false},
    {"%YAML 1.1\nloss: 1\n", false},
    {"\t\nloss: 1\n", false},
    {"{a: 1}\nb: 2\n", false},
    {"{a: 1} x\n", false},
    {"loss: 1\nfoo\n", false},
    {"loss: 1\nfoo bar\n", false},
    {"loss: 1\n..\n", false},
    {"loss: 1\n...# c\n", false},
    {"a: \"x\n...\n\"\n", false},
};

// Whether /usr/bin/python3's yaml.safe_load reads text; nullopt without PyYAML.
std::optional<bool> PyYamlAccepts(const std::string& text) {
  testing::TempDir dir;
  testing::WriteFile(dir.path() + "/CKPT.yaml", text);
  const std::string cmd =
      "/usr/bin/python3 -c 'import sys, yaml\ntry:\n yaml.safe_load(open(sys.argv[1]))\n"
      "except yaml.YAMLError:\n sys.exit(3)' " +
      dir.path() + "/CKPT.yaml 2>/dev/null";
  int rc = std::system(cmd.c_str());
  if (rc == -1 || !WIFEXITED(rc)) return std::nullopt;
  if (WEXITSTATUS(rc) == 0) return true;
  if (WEXITSTATUS(rc) == 3) return false;
  return std::nullopt;  // no python3 or no yaml module
}

TEST(MetaTest, SpeechBrainYamlStreamRulesMatchPyYaml) {
  for (const StreamCase& c : kStreamCases) {
    Result<Meta> m = ParseSpeechBrainYaml(c.text, "/x/CKPT+1/CKPT.yaml");
    EXPECT_EQ(m.ok(), c.pyyaml_accepts) << c.text << (m.ok() ? "" : m.status().message());
    if (!m.ok()) {
      EXPECT_NE(m.status().message().find("/x/CKPT+1/CKPT.yaml"), std::string::npos);
    } else if (std::string(c.text).find("loss") != std::string::npos) {
      EXPECT_NE(m->Find("loss"), nullptr) << c.text;
    }
    if (std::optional<bool> py = PyYamlAccepts(c.text)) {
      EXPECT_EQ(*py, c.pyyaml_accepts) << "PyYAML disagrees with the table: " << c.text;
    }
  }
}

TEST(MetaTest, DuplicateKeysKeepFirstPlaceAndLastValueAsPythonDicts) {
  Result<Meta> y = ParseSpeechBrainYaml("a: 1\nb: 2\na: 3\nc: [1]\nc: 4\nb: [2]\n", "y");
  ASSERT_TRUE(y.ok()) << y.status().message();
  ASSERT_EQ(y->entries.size(), 2u);
  EXPECT_EQ(y->entries[0].first, "a");
  EXPECT_EQ(*y->Number("a"), 3);
  EXPECT_EQ(*y->Number("c"), 4);
  EXPECT_EQ(y->Find("b"), nullptr);
  EXPECT_EQ(y->skipped, std::vector<std::string>{"b"});
  Result<Meta> j = ParseNativeJson(R"({"z": 1, "a": 2, "z": 3, "n": {"x": 1}, "n": 5})", "j");
  ASSERT_TRUE(j.ok()) << j.status().message();
  ASSERT_EQ(j->entries.size(), 3u);
  EXPECT_EQ(j->entries[0].first, "z");  // source order, as json.loads keeps it
  EXPECT_EQ(*j->Number("z"), 3);
  EXPECT_EQ(*j->Number("n"), 5);
  EXPECT_TRUE(j->skipped.empty());
}

TEST(MetaTest, SetReplacesInPlaceAndScalesToManyKeys) {
  Meta m;
  constexpr int kKeys = 200000;  // a scan per Set took minutes here
  for (int i = 0; i < kKeys; ++i) m.Set("key_" + std::to_string(i), MetaValue::Number(i));
  for (int i = 0; i < kKeys; i += 2) m.Set("key_" + std::to_string(i), MetaValue::Number(-i));
  ASSERT_EQ(m.entries.size(), static_cast<size_t>(kKeys));
  EXPECT_EQ(m.entries[10].first, "key_10");
  EXPECT_EQ(*m.Number("key_10"), -10);
  EXPECT_EQ(*m.Number("key_11"), 11);
  // Entries added without Set (as the index does when it loads a row) are
  // found and replaced, never duplicated.
  m.entries.emplace_back("direct", MetaValue::Number(1));
  m.Set("direct", MetaValue::Number(2));
  m.Set("key_3", MetaValue::Number(33));
  EXPECT_EQ(m.entries.size(), static_cast<size_t>(kKeys) + 1);
  EXPECT_EQ(*m.Number("direct"), 2);
  EXPECT_EQ(*m.Number("key_3"), 33);
  Meta copy = m;
  copy.Set("key_4", MetaValue::String("x"));
  EXPECT_EQ(copy.Find("key_4")->text, "x");
  EXPECT_EQ(*m.Number("key_4"), -4);
}

TEST(MetaTest, BudgetsAreErrorsNamingTheFileAndTheBudget) {
  const std::string big_yaml = "loss: [" + std::string(kMaxYamlMetaBytes, '1') + "]\n";
  std::string many_keys = "{";
  for (size_t i = 0; i <= kMaxMetaKeys; ++i)
    many_keys += (i ? ",\"k" : "\"k") + std::to_string(i) + "\":1";
  many_keys += "}";
  std::string many_yaml_keys;
  for (size_t i = 0; i <= kMaxMetaKeys; ++i) many_yaml_keys += "k" + std::to_string(i) + ": 1\n";
  struct Case {
    Result<Meta> result;
    const char* budget;
  } cases[] = {
      {ParseSpeechBrainYaml(big_yaml, "/e/CKPT+1/CKPT.yaml"), "byte budget"},
      {ParseNativeJson(std::string(kMaxJsonMetaBytes + 1, ' '), "/e/CKPT+1/CKPT.yaml"),
       "byte budget"},
      {ParseNativeJson(many_keys, "/e/CKPT+1/CKPT.yaml"), "budget of 10000"},
      {ParseSpeechBrainYaml(many_yaml_keys, "/e/CKPT+1/CKPT.yaml"), "budget of 10000"},
      {ParseNativeJson(std::string(1 << 20, '['), "/e/CKPT+1/CKPT.yaml"), "top level"},
      {ParseNativeJson("{\"a\": " + std::string(1 << 20, '['), "/e/CKPT+1/CKPT.yaml"),
       "deeper than the budget"},
      {ParseTrainerState("{\"log_history\": " + std::string(1 << 20, '['), "/e/CKPT+1/CKPT.yaml"),
       "deeper than the budget"},
      {ParseSpeechBrainYaml("a: " + std::string(100000, '[') + std::string(100000, ']'),
                            "/e/CKPT+1/CKPT.yaml"),
       "YAML"},
      {ParseSpeechBrainYaml(
           "a:\n  " +
               [] {
                 std::string s;
                 for (int i = 0; i < 60000; ++i) s += "- ";
                 return s;
               }() +
               "x\n",
           "/e/CKPT+1/CKPT.yaml"),
       "YAML"},
      {ParseSpeechBrainYaml(
           "a: " + std::string(kMaxYamlDepth, '[') + std::string(kMaxYamlDepth, ']') + "\n",
           "/e/CKPT+1/CKPT.yaml"),
       "nested deeper than the budget"},
  };
  for (const Case& c : cases) {
    ASSERT_FALSE(c.result.ok()) << c.budget;
    EXPECT_NE(c.result.status().message().find("/e/CKPT+1/CKPT.yaml"), std::string::npos);
    EXPECT_NE(c.result.status().message().find(c.budget), std::string::npos)
        << c.result.status().message();
  }
  // Just inside the budgets is read.
  Result<Meta> deep = ParseSpeechBrainYaml("a: " + std::string(kMaxYamlDepth - 1, '[') +
                                               std::string(kMaxYamlDepth - 1, ']') + "\nloss: 1\n",
                                           "y");
  ASSERT_TRUE(deep.ok()) << deep.status().message();
  EXPECT_EQ(deep->skipped, std::vector<std::string>{"a"});
  many_keys.erase(many_keys.rfind(','));
  EXPECT_TRUE(ParseNativeJson(many_keys + "}", "j").ok());
}

TEST(MetaTest, YamlAliasesDoNotExplode) {
  // Each level refers to the one before ten times: 10^9 nodes if expanded.
  std::string text = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n";
  for (int i = 1; i < 10; ++i) {
    std::string prev = "*a" + std::to_string(i - 1);
    text += "a" + std::to_string(i) + ": &a" + std::to_string(i) + " [";
    for (int k = 0; k < 10; ++k) text += (k ? ", " : "") + prev;
    text += "]\n";
  }
  text += "loss: 1\n";
  Result<Meta> m = ParseSpeechBrainYaml(text, "/e/CKPT+1/CKPT.yaml");
  // PyYAML shares aliased objects and reads it; ckptfs refuses what it will
  // not walk, naming the budget, and does not hang.
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("aliases"), std::string::npos) << m.status().message();
  Result<Meta> small = ParseSpeechBrainYaml("a: &x 0.5\nb: *x\n", "y");
  ASSERT_TRUE(small.ok()) << small.status().message();
  EXPECT_EQ(*small->Number("b"), 0.5);
}

// Found by fuzzing: yaml-cpp's LoadAll never ends on this input (it makes
// empty documents forever, growing without bound). PyYAML refuses it.
TEST(MetaTest, YamlThatYamlCppWouldLoopOnIsRefusedAtOnce) {
  Result<Meta> m = ParseSpeechBrainYaml(",..loss: 1\nfoos", "/e/CKPT+1/CKPT.yaml");
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("/e/CKPT+1/CKPT.yaml: not valid YAML"), std::string::npos)
      << m.status().message();
}

TEST(MetaTest, JsonReadsNanAndInfinityAsPythonDoes) {
  Result<Meta> m = ParseNativeJson(
      R"({"loss": NaN, "up": Infinity, "down": -Infinity, "s": "NaN, Infinity", "NaN": 1,)"
      R"( "list": [NaN, -Infinity], "after": 0.5})",
      "meta.json");
  ASSERT_TRUE(m.ok()) << m.status().message();
  EXPECT_EQ(m->Find("loss")->type, MetaType::kNumber);
  EXPECT_TRUE(std::isnan(m->Find("loss")->number));
  EXPECT_FALSE(m->Number("loss").has_value());  // NaN never competes
  EXPECT_EQ(*m->Number("up"), INFINITY);
  EXPECT_EQ(*m->Number("down"), -INFINITY);
  EXPECT_EQ(m->Find("s")->text, "NaN, Infinity");
  EXPECT_EQ(*m->Number("NaN"), 1);
  EXPECT_EQ(*m->Number("after"), 0.5);
  EXPECT_EQ(m->skipped, std::vector<std::string>{"list"});
  // What json.loads refuses, ckptfs refuses.
  for (const char* bad : {R"({"a": -NaN})", R"({"a": +Infinity})", R"({"a": nan})", R"({"a": inf})",
                          R"({"a": NaNx})", R"({"a": NaN1})", R"({"a": 1e-Infinity})",
                          R"({"a": "x"} NaN)", "\xEF\xBB\xBF{\"a\": 1}", R"({NaN: 1})", ""}) {
    EXPECT_FALSE(ParseNativeJson(bad, "meta.json").ok()) << bad;
  }
}

TEST(MetaTest, TrainerStateWithNanGradNormKeepsItsMetrics) {
  const char* text = R"({"epoch": 2.0, "global_step": 200, "log_history": [
      {"grad_norm": NaN, "loss": 0.9, "step": 100},
      {"eval_loss": 0.9, "step": 100},
      {"grad_norm": Infinity, "loss": NaN, "step": 200},
      {"eval_loss": 0.5, "eval_bleu": NaN, "eval_wer": Infinity, "step": 200}]})";
  Result<Meta> m = ParseTrainerState(text, "trainer_state.json");
  ASSERT_TRUE(m.ok()) << m.status().message();
  EXPECT_EQ(*m->Number("global_step"), 200);
  EXPECT_EQ(*m->Number("eval_loss"), 0.5);
  EXPECT_EQ(*m->Number("eval_wer"), INFINITY);
  ASSERT_NE(m->Find("eval_bleu"), nullptr);
  EXPECT_FALSE(m->Number("eval_bleu").has_value());
  EXPECT_EQ(m->Find("grad_norm"), nullptr);
  // global_step after log_history (not how the Trainer writes it) works too.
  Result<Meta> late = ParseTrainerState(
      R"({"log_history": [{"eval_loss": 0.7, "step": 5}, {"eval_loss": 0.1, "step": 6}],)"
      R"( "global_step": 5})",
      "t");
  ASSERT_TRUE(late.ok()) << late.status().message();
  EXPECT_EQ(*late->Number("eval_loss"), 0.7);
  EXPECT_FALSE(ParseTrainerState(R"({"global_step": NaN})", "t").ok());
  EXPECT_FALSE(ParseTrainerState(R"({"global_step": 1, "log_history": {}})", "t").ok());
}

TEST(MetaTest, SingleFileNames) {
  struct Case {
    const char* name;
    std::vector<std::pair<std::string, double>> numbers;
  } cases[] = {
      {"epoch=3-step=100-val_loss=0.25.ckpt", {{"epoch", 3}, {"step", 100}, {"val_loss", 0.25}}},
      {"best_model_9_val_acc=0.77.pt", {{"index", 9}, {"val_acc", 0.77}}},
      {"checkpoint_12.pt", {{"index", 12}}},
      {"model-epoch=10-val_loss=-1.5e-3.pth", {{"epoch", 10}, {"val_loss", -1.5e-3}}},
      {"ckpt7.safetensors", {{"index", 7}}},
  };
  for (const Case& c : cases) {
    std::optional<Meta> m = ParseSingleFileName(c.name);
    ASSERT_TRUE(m.has_value()) << c.name;
    EXPECT_EQ(m->entries.size(), c.numbers.size()) << c.name;
    for (const auto& [k, v] : c.numbers) {
      ASSERT_TRUE(m->Number(k).has_value()) << c.name << " " << k;
      EXPECT_DOUBLE_EQ(*m->Number(k), v) << c.name << " " << k;
    }
  }
  for (const char* not_ckpt : {"last.ckpt", "model.pt", "notes.txt", "epoch=3.txt", ".pt",
                               "hyperparams.yaml", "checkpoint_1234567890123456789.pt"}) {
    EXPECT_FALSE(ParseSingleFileName(not_ckpt).has_value()) << not_ckpt;
  }
}

TEST(MetaTest, TokensAreTyped) {
  EXPECT_EQ(MetaValue::FromToken("0.5").type, MetaType::kNumber);
  EXPECT_EQ(MetaValue::FromToken("-3").number, -3);
  EXPECT_EQ(MetaValue::FromToken("true").type, MetaType::kBool);
  EXPECT_EQ(MetaValue::FromToken("full").type, MetaType::kString);
  EXPECT_EQ(MetaValue::FromToken("0x10").type, MetaType::kString);
  EXPECT_EQ(MetaValue::FromToken("nan").type, MetaType::kString);
  EXPECT_EQ(MetaValue::Number(0.25).text, "0.25");
  EXPECT_EQ(MetaValue::Number(100).text, "100");
}

}  // namespace
}  // namespace ckptfs::core
