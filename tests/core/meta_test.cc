#include "core/meta.h"

#include <gtest/gtest.h>

#include <cmath>

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
