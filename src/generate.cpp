// Text generation (chapter 7, "Samples"). See generate.hpp.
#include "generate.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

namespace qlora {

namespace {
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

int sample_token(const std::vector<float>& logits, float temperature, float top_p, std::mt19937_64& rng) {
  if (logits.empty()) throw std::invalid_argument("sample_token: empty logits");
  const auto argmax = static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  if (temperature <= 0.0f) return argmax;
  // Softmax in double, shifted by the maximum for stability.
  const double mx = logits[static_cast<std::size_t>(argmax)];
  std::vector<double> prob(logits.size());
  double sum = 0;
  for (std::size_t i = 0; i < logits.size(); ++i) sum += prob[i] = std::exp((logits[i] - mx) / temperature);
  std::vector<int> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int a, int b) {
    return prob[static_cast<std::size_t>(a)] > prob[static_cast<std::size_t>(b)];
  });
  // The nucleus: the most probable tokens until their mass reaches top_p (at least one).
  std::size_t keep = 0;
  double mass = 0;
  while (keep < order.size() && (keep == 0 || mass < top_p * sum))
    mass += prob[static_cast<std::size_t>(order[keep++])];
  double u = uniform01(rng) * mass;
  for (std::size_t i = 0; i < keep; ++i) {
    u -= prob[static_cast<std::size_t>(order[i])];
    if (u < 0) return order[i];
  }
  return order[keep - 1];
}

// Generation stops where the model's attention ends: its context or a shorter sliding window.
int context_limit(const LlamaConfig& c) { return c.sliding_window > 0 ? std::min(c.seq_len, c.sliding_window) : c.seq_len; }

std::vector<int> prompt_ids(const Tokenizer& tok, const std::string& prompt) {
  std::vector<int> ids{tok.bos_id()};
  const auto p = tok.encode(prompt);
  ids.insert(ids.end(), p.begin(), p.end());
  return ids;
}

void check_generation_fits(const LlamaConfig& c, int prompt_tokens, int max_tokens) {
  const int limit = context_limit(c);
  if (static_cast<long long>(prompt_tokens) + max_tokens > limit)
    throw std::invalid_argument("a prompt of " + std::to_string(prompt_tokens) + " tokens (BOS included) plus --max-tokens " +
                                std::to_string(max_tokens) + " exceeds the model's context of " + std::to_string(limit) +
                                " tokens");
}

std::vector<int> generate_ids(LlamaModel& model, const Tokenizer& tok, std::vector<int> ids, const SampleConfig& cfg,
                              const std::string& stop, std::optional<int> stop_token) {
  const int limit = context_limit(model.config());
  if (ids.empty()) throw std::invalid_argument("generate: empty prompt");
  if (static_cast<int>(ids.size()) >= limit)
    throw std::invalid_argument("prompt is longer than the model's context of " + std::to_string(limit) + " tokens");
  const std::size_t prompt = ids.size();
  std::mt19937_64 rng(cfg.seed);
  model.reset_kv();
  const std::vector<float>* logits = nullptr;
  for (std::size_t i = 0; i < ids.size(); ++i) logits = &model.decode_step(ids[i], static_cast<int>(i));
  for (int n = 0; n < cfg.max_tokens && static_cast<int>(ids.size()) < limit; ++n) {
    const int next = sample_token(*logits, cfg.temperature, cfg.top_p, rng);
    if (next == tok.eos_id() || next == tok.bos_id() || next == stop_token) break;
    ids.push_back(next);
    if (!stop.empty()) {
      if (ends_with(tok.decode({ids.begin() + static_cast<std::ptrdiff_t>(prompt), ids.end()}), stop)) break;
    }
    if (static_cast<int>(ids.size()) < limit) logits = &model.decode_step(next, static_cast<int>(ids.size()) - 1);
  }
  return ids;
}

std::string generate_text(LlamaModel& model, const Tokenizer& tok, const std::string& prompt, const SampleConfig& cfg) {
  return tok.decode(generate_ids(model, tok, prompt_ids(tok, prompt), cfg));
}

std::string generate_reply(LlamaModel& model, const Tokenizer& tok, ChatTemplate t, const Conversation& prompt,
                           const SampleConfig& cfg) {
  const auto ids = tokenize_chat(render_chat(t, prompt, true), tok).ids;
  const std::string stop = turn_end_text(t);
  const std::string end_token = turn_end_token(t);
  const auto stop_token = end_token.empty() ? std::nullopt : std::optional(template_token_id(t, end_token, tok));
  const auto all = generate_ids(model, tok, ids, cfg, stop, stop_token);
  std::string reply = tok.decode({all.begin() + static_cast<std::ptrdiff_t>(ids.size()), all.end()});
  if (!stop.empty() && ends_with(reply, stop)) reply.resize(reply.size() - stop.size());
  return reply;
}

}  // namespace qlora
