// Chapter 8, instruction tuning on the CPU: JSONL records and the errors that name their
// line and field, the records skipped and counted, labels on the responses only (or on
// everything), right-padded batches that change no real token's loss or gradient,
// transformers' length grouping, the loss normalized over every counted token of a step,
// a resumed run that sees the same batches, and `qlora finetune` / `qlora generate`
// with instruction data.
#include "example_batches.hpp"
#include "file_helpers.hpp"
#include "finetune.hpp"
#include "generate.hpp"
#include "hf_llama.hpp"
#include "instruct_data.hpp"
#include "instruct_helpers.hpp"
#include "lora_helpers.hpp"
#include "model_helpers.hpp"

#include <nlohmann/json.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>
#include <set>
#include <string>
#include <vector>

using namespace qlora;
using qlora::test::PieceTokenizer;
using qlora::test::host_grads;
using qlora::test::rel_frobenius;
namespace fs = std::filesystem;

namespace {

fs::path write_jsonl(const std::string& name, const std::vector<std::string>& lines) {
  const fs::path p = test::temp_path("ch08", name);
  std::ofstream out(p, std::ios::trunc);
  for (const auto& l : lines) out << l << "\n";
  return p;
}

const PieceTokenizer& piece_tok() {
  static const PieceTokenizer tok({" the", " word", "[INST]", " [/INST]", "### Response:"});
  return tok;
}

// A small LLaMA (random weights, vocabulary 300 by default) with adapters.
LlamaModel small_model(std::uint64_t seed, int vocab = 300) {
  LlamaConfig c = test::tiny_config(2, true);
  c.vocab_size = vocab;
  c.seq_len = 48;
  LlamaModel m(random_llama_weights(c, seed), BaseStorage::float32);
  test::add_random_lora(m, 0.0f, seed + 1);
  return m;
}

// Examples of the given lengths; the second half of each is the "answer".
std::vector<Example> random_examples(const std::vector<int>& lengths, int vocab, std::uint64_t seed) {
  return test::labelled_examples(lengths, vocab, seed, 0.5);
}

}  // namespace

TEST_CASE("JSONL records: Alpaca and conversations, and a malformed one names FILE:LINE and the field", "[ch08][data]") {
  const auto good = write_jsonl("good.jsonl", {
      R"({"instruction": "Define cat.", "output": "a small feline"})",
      "",
      R"({"instruction": "Define", "input": "dog", "output": "a canine", "id": 7})",
      R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},)"
      R"( {"role": "assistant", "content": "hello"}]})",
  });
  const auto recs = read_instruct_jsonl(good);
  REQUIRE(recs.size() == 3);
  CHECK(recs[0].line == 1);
  CHECK(recs[1].line == 3);  // the blank line is skipped, lines still count
  CHECK(recs[1].conversation.instruction_record);
  CHECK(recs[1].conversation.input == "dog");
  CHECK(recs[2].conversation.messages.size() == 3);
  CHECK(default_template(recs) == ChatTemplate::llama2);
  CHECK(default_template({recs[0], recs[1]}) == ChatTemplate::alpaca);

  struct Bad {
    std::string line, fragment;
  };
  const std::vector<Bad> bad = {
      {R"({"instruction": "x")", "not JSON"},
      {R"([1, 2])", "a record is a JSON object, this is array"},
      {R"({"text": "x"})", "needs \"messages\" (a conversation) or \"instruction\""},
      {R"({"instruction": "x", "messages": []})", "not both"},
      {R"({"instruction": 3, "output": "y"})", "field \"instruction\" is number, expected a string"},
      {R"({"instruction": "x"})", "has no \"output\""},
      {R"({"instruction": "x", "input": null, "output": "y"})", "field \"input\" is null"},
      {R"({"messages": {}})", "field \"messages\" is object, expected an array"},
      {R"({"messages": []})", "field \"messages\" is empty"},
      {R"({"messages": ["hi"]})", "message 1 is string, expected an object"},
      {R"({"messages": [{"content": "hi"}]})", "message 1 has no \"role\""},
      {R"({"messages": [{"role": "human", "content": "hi"}]})", "message 1 field \"role\" is \"human\""},
      {R"({"messages": [{"role": "user", "content": ["hi"]}]})", "message 1 field \"content\" is array"},
      {R"({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]})",
       "message 2 is a system message: only the first may be"},
  };
  for (const auto& b : bad) {
    const auto file = write_jsonl("bad.jsonl", {R"({"instruction": "ok", "output": "fine"})", b.line});
    INFO(b.line);
    CHECK_THROWS_WITH(read_instruct_jsonl(file), Catch::Contains(file.string() + ":2: ") && Catch::Contains(b.fragment));
  }
  CHECK_THROWS_WITH(read_instruct_jsonl(write_jsonl("empty.jsonl", {"", " "})), Catch::Contains("holds no record"));
  CHECK_THROWS_WITH(read_instruct_jsonl(test::temp_path("ch08", "missing.jsonl")), Catch::Contains("cannot read"));
}

TEST_CASE("Examples: labels on the responses only, or on every token, and skipped records counted with their lines",
          "[ch08][data]") {
  const auto file = write_jsonl("mixed.jsonl", {
      R"({"instruction": "the word", "output": "the"})",
      R"({"instruction": "the word", "output": "  "})",
      R"({"messages": [{"role": "user", "content": "the"}]})",
      R"({"instruction": "the word", "output": "the word the word the word the word the word"})",
      R"({"messages": [{"role": "user", "content": "the"}, {"role": "assistant", "content": "word"},)"
      R"( {"role": "user", "content": "the word"}, {"role": "assistant", "content": ""}]})",
      R"({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})",
  });
  auto records = read_instruct_jsonl(file);
  const auto valid = std::vector<InstructRecord>(records.begin(), records.end() - 1);
  SkippedRecords skipped;
  const auto ex = make_examples(valid, piece_tok(), {ChatTemplate::llama2, false, 16}, file, skipped);
  REQUIRE(ex.size() == 1);
  CHECK(ex[0].line == 1);
  // The answer is " the " and EOS: its tokens carry labels, the prompt's do not.
  const TokenizedChat t = tokenize_chat(render_chat(ChatTemplate::llama2, valid[0].conversation, false), piece_tok());
  REQUIRE(ex[0].ids == t.ids);
  for (std::size_t i = 0; i < t.ids.size(); ++i) CHECK(ex[0].labels[i] == (t.assistant_mask[i] ? t.ids[i] : kIgnoreIndex));
  CHECK(ex[0].labels.back() == piece_tok().eos_id());
  CHECK(std::count(ex[0].labels.begin(), ex[0].labels.end(), kIgnoreIndex) > 3);
  CHECK(skipped.empty_answer == 2);  // lines 2 and 5 (a blank answer anywhere in the conversation)
  CHECK(skipped.no_loss == 1);       // line 3
  CHECK(skipped.too_long == 1);      // line 4
  CHECK(skipped.lines == std::vector<int>{2, 3, 4, 5});
  CHECK(skipped.summary(16) ==
        "4 records skipped: 2 with an empty answer, 1 with no assistant turn, 1 longer than --seq-len 16 + 1 tokens "
        "(lines 2, 3, 4, 5)");

  // --train-on-inputs: every label but the first is the next id; the user-only record now teaches.
  SkippedRecords skipped_all;
  const auto all = make_examples(valid, piece_tok(), {ChatTemplate::llama2, true, 16}, file, skipped_all);
  REQUIRE(all.size() == 2);
  CHECK(all[0].labels == all[0].ids);
  CHECK(skipped_all.no_loss == 0);

  // A record the template cannot render is an error naming its line.
  CHECK_THROWS_WITH(make_examples(records, piece_tok(), {ChatTemplate::llama2, false, 64}, file, skipped),
                    Catch::Contains(file.string() + ":6: template llama2: message 2 is user, expected assistant"));
}

TEST_CASE("Instruction data: the held-out split, and no example left is an error naming the file", "[ch08][data]") {
  std::vector<std::string> lines;
  for (int i = 0; i < 20; ++i) lines.push_back(R"({"instruction": "the word )" + std::to_string(i) + R"(", "output": "the"})");
  const auto file = write_jsonl("twenty.jsonl", lines);
  InstructDataReport report;
  // The alpaca preamble is mostly byte tokens with this tokenizer: about 200 of them.
  const auto d = load_instruct_data(file, {}, piece_tok(), std::nullopt, true, 512, report);
  CHECK(report.chat_template == ChatTemplate::alpaca);
  CHECK(report.train_records == 18);
  CHECK(d.train_examples.size() == 18);
  REQUIRE(d.val_examples.size() == 2);
  CHECK(d.val_examples[0].line == 19);  // the last 10%, contiguous
  // Held-out labels are on the responses only even with --train-on-inputs.
  CHECK(d.val_examples[0].labels.front() == kIgnoreIndex);
  CHECK(d.train_examples[0].labels.front() == d.train_examples[0].ids.front());
  REQUIRE(report.val_samples.size() == 2);
  CHECK(report.val_samples[0].messages[0].content == "the word 18");

  const auto val = write_jsonl("val.jsonl", {R"({"instruction": "x", "output": "y"})"});
  const auto d2 = load_instruct_data(file, val, piece_tok(), ChatTemplate::chatml, false, 512, report);
  CHECK(d2.train_examples.size() == 20);
  CHECK(d2.val_examples.size() == 1);
  CHECK(report.chat_template == ChatTemplate::chatml);

  CHECK_THROWS_WITH(load_instruct_data(file, {}, piece_tok(), std::nullopt, false, 4, report),
                    Catch::Contains("no training example left in " + file.string()) &&
                        Catch::Contains("longer than --seq-len 4"));
  CHECK_THROWS_WITH(load_instruct_data(val, {}, piece_tok(), std::nullopt, false, 512, report),
                    Catch::Contains("too few to hold some out"));
}

TEST_CASE("pad_batch: right padding to the batch's longest, no loss on pads", "[ch08][batches]") {
  const auto ex = random_examples({5, 9, 3}, 50, 1);
  const MicroBatch mb = pad_batch(ex, {1, 2}, 0);
  CHECK(mb.B == 2);
  CHECK(mb.T == 8);  // the longest has 9 ids: 8 inputs
  for (int t = 0; t < 8; ++t) {
    CHECK(mb.x[static_cast<std::size_t>(t)] == ex[1].ids[static_cast<std::size_t>(t)]);
    CHECK(mb.y[static_cast<std::size_t>(t)] == ex[1].labels[static_cast<std::size_t>(t) + 1]);
  }
  for (int t = 2; t < 8; ++t) {  // example 2 has 3 ids: inputs 0..1, then padding
    CHECK(mb.x[static_cast<std::size_t>(8 + t)] == 0);
    CHECK(mb.y[static_cast<std::size_t>(8 + t)] == kIgnoreIndex);
  }
  // Counted: labels 1..n-1 that are not ignored (the second half of each example).
  CHECK(mb.counted == (9 - 4) + (3 - 1));
}

TEST_CASE("Length grouping follows transformers, and the schedule is a function of seed and epoch", "[ch08][batches]") {
  // 400 examples, batch 4: megabatches of min(400 / 16, 50) = 25 batches = 100 examples.
  std::vector<int> lengths(400);
  std::mt19937_64 rng(3);
  for (int& l : lengths) l = 2 + static_cast<int>(rng() % 60);
  std::vector<int> perm(400);
  std::iota(perm.begin(), perm.end(), 0);
  std::reverse(perm.begin(), perm.end());
  const auto order = length_grouped_order(lengths, 4, perm);
  CHECK(std::set<int>(order.begin(), order.end()).size() == 400);
  const int longest = *std::max_element(lengths.begin(), lengths.end());
  CHECK(lengths[static_cast<std::size_t>(order[0])] == longest);
  for (std::size_t m = 0; m < 400; m += 100) {
    // Longest first within each megabatch (its first element may be the one the swap moved).
    for (std::size_t i = m + 2; i < m + 100; ++i)
      CHECK(lengths[static_cast<std::size_t>(order[i])] <= lengths[static_cast<std::size_t>(order[i - 1])]);
    // A megabatch holds the permutation's slice, but for the one element the swap exchanged.
    const std::set<int> got(order.begin() + static_cast<std::ptrdiff_t>(m), order.begin() + static_cast<std::ptrdiff_t>(m + 100));
    int common = 0;
    for (std::size_t i = m; i < m + 100; ++i) common += got.count(perm[i]) > 0;
    CHECK(common >= 99);
  }

  ExampleSchedule a(lengths, 4, 9, true), b(lengths, 4, 9, true), other(lengths, 4, 10, true);
  CHECK(a.batches_per_epoch() == 100);
  CHECK(a.batch(257) == b.batch(257));  // epoch 2, out of order: nothing carried between calls
  CHECK(a.batch(3) == b.batch(3));
  CHECK(a.epoch_order(0) != a.epoch_order(1));
  CHECK(a.epoch_order(0) != other.epoch_order(0));
  ExampleSchedule odd(std::vector<int>(10, 5), 4, 1, false);
  CHECK(odd.batches_per_epoch() == 3);
  CHECK(odd.batch(2).size() == 2);  // the epoch's last batch is short
  CHECK(odd.batch(3).size() == 4);  // the next epoch starts
  std::vector<int> seen;
  for (int k = 0; k < 3; ++k)
    for (int i : odd.batch(k)) seen.push_back(i);
  CHECK(std::set<int>(seen.begin(), seen.end()).size() == 10);
}

TEST_CASE("Right padding changes no real token's loss or gradient (attention is causal)", "[ch08][batches]") {
  LlamaModel m = small_model(11);
  const auto ex = random_examples({7, 19, 12}, 300, 5);
  std::mt19937_64 rng(0);
  // Each example alone, unpadded: its loss (mean over its counted targets) and gradient.
  double loss_sum = 0;
  std::int64_t counted = 0;
  std::vector<float> g_sum;
  for (int i = 0; i < 3; ++i) {
    const MicroBatch one = pad_batch(ex, {i}, 0);
    m.zero_grad();
    loss_sum += static_cast<double>(m.forward(one.x.data(), one.y.data(), 1, one.T, false, rng)) * static_cast<double>(one.counted);
    m.backward();
    auto g = host_grads(m);
    if (g_sum.empty()) g_sum.assign(g.size(), 0.0f);
    for (std::size_t k = 0; k < g.size(); ++k) g_sum[k] += g[k] * static_cast<float>(one.counted);
    counted += one.counted;
  }
  for (float& v : g_sum) v /= static_cast<float>(counted);
  // The three padded into one batch (pads of different ids, to show they are never read).
  for (int pad : {0, 299}) {
    const MicroBatch all = pad_batch(ex, {0, 1, 2}, pad);
    REQUIRE(all.counted == counted);
    m.zero_grad();
    const double loss = m.forward(all.x.data(), all.y.data(), 3, all.T, false, rng);
    m.backward();
    CHECK(loss == Approx(loss_sum / static_cast<double>(counted)).epsilon(1e-5));
    CHECK(rel_frobenius(host_grads(m), g_sum) < 1e-4);
  }
}

TEST_CASE("Gradient accumulation: the mean over every counted token of the step, as one batch", "[ch08][batches]") {
  LlamaModel m = small_model(21);
  CpuTrainer tr(m, OptimKind::adamw, 0.0f);
  const auto ex = random_examples({30, 8}, 300, 9);  // 15 and 4 counted targets
  std::mt19937_64 rng(1);
  tr.zero_grad();
  const double one = accumulate_gradients(tr, {pad_batch(ex, {0, 1}, 0)}, rng);
  const auto g_one = host_grads(m);
  tr.zero_grad();
  const std::vector<MicroBatch> two = {pad_batch(ex, {0}, 0), pad_batch(ex, {1}, 0)};
  const double acc = accumulate_gradients(tr, two, rng);
  const auto g_acc = host_grads(m);
  CHECK(acc == Approx(one).epsilon(1e-5));
  CHECK(rel_frobenius(g_acc, g_one) < 1e-4);
  // The plain average of the two micro-batch means is a different quantity: this test would see it.
  tr.zero_grad();
  tr.train_micro_batch(two[0].x.data(), two[0].y.data(), 1, two[0].T, rng, 0);
  tr.train_micro_batch(two[1].x.data(), two[1].y.data(), 1, two[1].T, rng, 0);
  tr.scale_grads(0.5f);
  CHECK(rel_frobenius(host_grads(m), g_one) > 1e-2);
  // A micro-batch without a counted target is not run.
  MicroBatch none = pad_batch(ex, {1}, 0);
  std::fill(none.y.begin(), none.y.end(), kIgnoreIndex);
  none.counted = 0;
  tr.zero_grad();
  CHECK(accumulate_gradients(tr, {none, pad_batch(ex, {0, 1}, 0)}, rng) == Approx(one).epsilon(1e-5));
}

TEST_CASE("Instruction tuning: the loss on trained responses falls, and a resumed run trains on the same batches",
          "[ch08][finetune]") {
  std::vector<int> lengths;
  for (int i = 0; i < 24; ++i) lengths.push_back(6 + (i * 7) % 20);
  FinetuneData data;
  data.train_examples = random_examples(lengths, 300, 100);
  data.val_examples.assign(data.train_examples.begin(), data.train_examples.begin() + 3);
  FinetuneConfig cfg;
  cfg.steps = 6;
  cfg.batch = 3;
  cfg.grad_accum = 2;
  cfg.seq_len = 48;
  cfg.lr = 1e-2f;
  cfg.eval_every = 3;
  cfg.save_every = 3;
  cfg.seed = 5;
  cfg.progress = false;
  cfg.out = test::temp_path("ch08", "run_full");
  fs::remove_all(cfg.out);
  LlamaModel full = small_model(31);
  const auto rec = finetune(full, data, cfg);
  REQUIRE(rec.size() == 6);
  CHECK(rec[5].val_loss < rec[2].val_loss);
  // Padded positions are computed, so positions vary with the batches' longest example.
  CHECK(rec[0].positions > 0);

  LlamaModel resumed = small_model(31);
  FinetuneConfig rcfg = cfg;
  rcfg.resume = cfg.out / "checkpoint-3";
  rcfg.out = test::temp_path("ch08", "run_resumed");
  fs::remove_all(rcfg.out);
  const auto rest = finetune(resumed, data, rcfg);
  REQUIRE(rest.size() == 3);
  for (int i = 0; i < 3; ++i) {
    CHECK(rest[static_cast<std::size_t>(i)].loss == rec[static_cast<std::size_t>(i) + 3].loss);
    CHECK(rest[static_cast<std::size_t>(i)].positions == rec[static_cast<std::size_t>(i) + 3].positions);
  }
  // An example longer than --seq-len + 1 is refused by the loop too (the loader skips them).
  FinetuneConfig shorter = cfg;
  shorter.seq_len = 8;
  shorter.out.clear();
  LlamaModel m = small_model(31);
  CHECK_THROWS_WITH(finetune(m, data, shorter), Catch::Contains("more than --seq-len 8 + 1"));
}

TEST_CASE("Generation stops where the generated text ends with the turn's end, or at its end token",
          "[ch08][generate]") {
  const PieceTokenizer& tok = piece_tok();
  LlamaModel m = small_model(41, tok.vocab_size());  // every id the model picks has a piece
  SampleConfig s;
  s.max_tokens = 12;
  s.temperature = 1.0f;  // sampled from a fixed seed: varied tokens, the same in both runs
  const std::vector<int> prompt{tok.bos_id(), 3, 4};
  // The first seed whose 12 tokens hold no EOS or BOS (which would stop it earlier).
  std::vector<int> free_run;
  for (s.seed = 1; free_run.size() != prompt.size() + 12; ++s.seed) {
    REQUIRE(s.seed < 100);
    free_run = generate_ids(m, tok, prompt, s);
  }
  --s.seed;
  // Stop at what the model writes as its 3rd to 5th tokens: it must stop after the 5th,
  // which is the first place the generated text ends with it.
  const std::string stop = tok.decode({free_run.begin() + 5, free_run.begin() + 8});
  REQUIRE(!stop.empty());
  for (int k = 1; k < 5; ++k) {
    const std::string text = tok.decode({free_run.begin() + 3, free_run.begin() + 3 + k});
    REQUIRE((text.size() < stop.size() || text.compare(text.size() - stop.size(), stop.size(), stop) != 0));
  }
  const auto stopped = generate_ids(m, tok, prompt, s, stop);
  CHECK(stopped == std::vector<int>(free_run.begin(), free_run.begin() + 8));
  // An end-of-turn token (llama3's <|eot_id|>), here the 4th token written: generation stops
  // where it first comes and, as at EOS, does not keep it.
  const int end_token = free_run[6];
  const auto first = std::find(free_run.begin() + 3, free_run.end(), end_token);
  CHECK(generate_ids(m, tok, prompt, s, "", end_token) == std::vector<int>(free_run.begin(), first));
}

TEST_CASE("qlora finetune and generate with instruction data (kjv15M, 3 steps)", "[ch08][cli]") {
  const auto model = test::model_or_fail("kjv15M.bin");
  if (!model) return;
  std::vector<std::string> lines = {R"({"instruction": "Define light.", "output": ""})"};
  for (int i = 0; i < 30; ++i)
    lines.push_back(R"({"messages": [{"role": "user", "content": "What does word )" + std::to_string(i) +
                    R"( mean?"}, {"role": "assistant", "content": "a unit of language"}]})");
  const auto data = write_jsonl("cli.jsonl", lines);
  const fs::path out = test::temp_path("ch08", "cli_out");
  fs::remove_all(out);
  const std::string common = "--model kjv15M.bin --data '" + data.string() + "' --steps 3 --batch 4 --seq-len 48 "
                             "--lr 3e-3 --warmup 0 --eval-every 0 --save-every 0 --sample-tokens 8 --device cpu --out '" +
                             out.string() + "'";
  const auto run = test::run_qlora("finetune " + common);
  INFO(run.output);
  REQUIRE(run.rc == 0);
  CHECK_THAT(run.output, Catch::Contains("27 train / 3 held-out examples (template llama2, loss on the responses)"));
  CHECK_THAT(run.output, Catch::Contains("training, " + data.string() + ": 1 record skipped: 1 with an empty answer (line 1)"));
  CHECK_THAT(run.output, Catch::Contains("prompt:    What does word 27 mean?"));
  CHECK_THAT(run.output, Catch::Contains("reference: a unit of language"));
  std::ifstream sin(out / "summary.json");
  const auto summary = nlohmann::json::parse(sin);
  CHECK(summary.at("template") == "llama2");
  CHECK(summary.at("train_on_inputs") == false);
  CHECK(summary.at("val_loss_after").get<double>() < summary.at("val_loss_before").get<double>());

  const std::string generate = "generate --model kjv15M.bin --adapter '" + (out / "adapter").string() +
                               "' --template llama2 --max-tokens 6";
  const auto gen = test::run_qlora(generate + " --prompt 'What does word 3 mean?'");
  INFO(gen.output);
  CHECK(gen.rc == 0);
  // --chat: one turn on stdin is the same reply as --prompt; a second turn (after an empty
  // line, skipped) is answered from the conversation so far, after the first reply.
  const std::string chat = "' " + generate + " --chat";
  const auto one_turn = test::run_shell("printf 'What does word 3 mean?\\n' | '" + test::qlora_bin() + chat);
  INFO(one_turn.output);
  CHECK(one_turn.rc == 0);
  CHECK(one_turn.output == gen.output);
  const auto two_turns =
      test::run_shell("printf 'What does word 3 mean?\\n\\nAnd word 4?\\n' | '" + test::qlora_bin() + chat);
  INFO(two_turns.output);
  CHECK(two_turns.rc == 0);
  CHECK(two_turns.output.size() > gen.output.size());
  CHECK(two_turns.output.compare(0, gen.output.size(), gen.output) == 0);
  const auto chat_alone = test::run_qlora("generate --model kjv15M.bin --chat");
  CHECK(chat_alone.rc != 0);
  CHECK_THAT(chat_alone.output, Catch::Contains("--chat needs --template"));
  // Refusals by name, before any model is loaded.
  const auto text_with_template = test::run_qlora("finetune --model kjv15M.bin --template chatml --steps 1");
  CHECK(text_with_template.rc != 0);
  CHECK_THAT(text_with_template.output, Catch::Contains("--template applies to instruction data (*.jsonl)"));
  const auto bad_template = test::run_qlora("finetune " + common + " --template vicuna");
  CHECK(bad_template.rc != 0);
  CHECK_THAT(bad_template.output, Catch::Contains("unknown template 'vicuna'"));
  const auto alpaca_system =
      test::run_qlora("generate --model kjv15M.bin --template alpaca --system 'Be brief.' --prompt hi");
  CHECK(alpaca_system.rc != 0);
  CHECK_THAT(alpaca_system.output, Catch::Contains("no system message"));
  const auto system_alone = test::run_qlora("generate --model kjv15M.bin --system 'Be brief.' --prompt hi");
  CHECK(system_alone.rc != 0);
  CHECK_THAT(system_alone.output, Catch::Contains("--system needs --template"));
  // llama3 with kjv15M's tokenizer.model, which has none of LLaMA-3's special tokens.
  for (const std::string& cmd : std::vector<std::string>{
           "finetune " + common + " --template llama3",
           "generate --model kjv15M.bin --template llama3 --prompt hi --max-tokens 2"}) {
    const auto llama3 = test::run_qlora(cmd);
    INFO(llama3.output);
    CHECK(llama3.rc != 0);
    CHECK_THAT(llama3.output, Catch::Contains("template llama3 needs the special token <|begin_of_text|>") &&
                                  Catch::Contains("tokenizer.model'"));
  }
}

TEST_CASE("qlora finetune and generate --template llama3 with a LLaMA-3-style folder (tokenizer.json)", "[ch08][cli]") {
  // Random weights over the vocabulary of chapter 7's byte-level BPE fixture, which has
  // LLaMA-3's special tokens; its tokenizer.json and tokenizer_config.json beside them, as in
  // a LLaMA-3 folder (no tokenizer.model).
  const fs::path model = test::temp_path("ch08", "llama3_model");
  fs::remove_all(model);
  LlamaConfig c = test::tiny_config(2, false);
  c.vocab_size = 4012;
  c.seq_len = 64;
  write_hf_llama(model, checkpoint_from_weights(random_llama_weights(c, 61)));
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
    fs::copy_file(fs::path(QLORA_FIXTURES_DIR) / "bpe" / f, model / f);
  std::vector<std::string> lines;
  for (int i = 0; i < 20; ++i)
    lines.push_back(R"({"messages": [{"role": "user", "content": "What does word )" + std::to_string(i) +
                    R"( mean?"}, {"role": "assistant", "content": "a unit of language"}]})");
  const auto data = write_jsonl("llama3.jsonl", lines);
  const fs::path out = test::temp_path("ch08", "llama3_out");
  fs::remove_all(out);
  const auto run = test::run_qlora("finetune --model '" + model.string() + "' --data '" + data.string() +
                                   "' --template llama3 --steps 2 --batch 4 --seq-len 48 --warmup 0 --eval-every 0 "
                                   "--save-every 0 --sample-tokens 4 --device cpu --out '" + out.string() + "'");
  INFO(run.output);
  REQUIRE(run.rc == 0);
  CHECK_THAT(run.output, Catch::Contains("18 train / 2 held-out examples (template llama3, loss on the responses)"));
  const std::string generate = "generate --model '" + model.string() + "' --adapter '" + (out / "adapter").string() +
                               "' --template llama3 --system 'Be brief.' --max-tokens 4";
  const auto gen = test::run_qlora(generate + " --prompt 'What does word 3 mean?'");
  INFO(gen.output);
  CHECK(gen.rc == 0);
  const auto chat =
      test::run_shell("printf 'What does word 3 mean?\\n' | '" + test::qlora_bin() + "' " + generate + " --chat");
  INFO(chat.output);
  CHECK(chat.rc == 0);
  CHECK(chat.output == gen.output);
}
