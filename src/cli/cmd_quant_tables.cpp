// `qlora tables ...` (chapters 1-3): prints every number the first three chapters
// state, as a text table, JSON or CSV (the notebook reads JSON). The measurements
// live in quant_experiments.hpp and are asserted by the chapter tests.
#include "command.hpp"

#include "dynamic_map.hpp"
#include "fp4.hpp"
#include "nf4.hpp"
#include "quant4.hpp"
#include "quant_experiments.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>

namespace {

using nlohmann::json;

// Output format shared by every table: text for people, json / csv for the notebook.
struct Output {
  std::string format = "text";
};

void add_format(CLI::App* cmd, Output& out) {
  cmd->add_option("--format", out.format, "output: text, json or csv")
      ->check(CLI::IsMember({"text", "json", "csv"}))
      ->capture_default_str();
}

// A table as header + rows of strings/numbers; printed as text, CSV or JSON records.
struct Table {
  std::vector<std::string> header;
  std::vector<std::vector<json>> rows;
};

std::string cell(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_number_integer()) return std::to_string(v.get<long long>());
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g", v.get<double>());
  return buf;
}

json records(const Table& t) {
  json arr = json::array();
  for (const auto& r : t.rows) {
    json o;
    for (std::size_t i = 0; i < t.header.size(); ++i) o[t.header[i]] = r[i];
    arr.push_back(o);
  }
  return arr;
}

void print_table(const Table& t) {
  std::vector<std::size_t> w(t.header.size());
  for (std::size_t i = 0; i < w.size(); ++i) {
    w[i] = t.header[i].size();
    for (const auto& r : t.rows) w[i] = std::max(w[i], cell(r[i]).size());
  }
  auto line = [&](const std::vector<std::string>& cells) {
    for (std::size_t i = 0; i < cells.size(); ++i) std::printf("%s%-*s", i ? "  " : "", static_cast<int>(w[i]), cells[i].c_str());
    std::printf("\n");
  };
  line(t.header);
  for (const auto& r : t.rows) {
    std::vector<std::string> cells;
    for (const auto& v : r) cells.push_back(cell(v));
    line(cells);
  }
}

// Prints `t`; in JSON the records go under "rows", next to `extra` fields.
void emit(const Output& out, const Table& t, json extra = json::object()) {
  if (out.format == "json") {
    extra["rows"] = records(t);
    std::printf("%s\n", extra.dump(1).c_str());
  } else if (out.format == "csv") {
    for (std::size_t i = 0; i < t.header.size(); ++i) std::printf("%s%s", i ? "," : "", t.header[i].c_str());
    std::printf("\n");
    for (const auto& r : t.rows) {
      for (std::size_t i = 0; i < r.size(); ++i) std::printf("%s%s", i ? "," : "", cell(r[i]).c_str());
      std::printf("\n");
    }
  } else {
    print_table(t);
    for (auto it = extra.begin(); it != extra.end(); ++it) {
      if (!it.value().is_structured()) std::printf("%s: %s\n", it.key().c_str(), cell(it.value()).c_str());
    }
  }
}

void check_blocksize_flag(int blocksize) {
  try {
    qlora::check_blocksize(blocksize);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("--blocksize: ") + e.what());
  }
}

void table_nf4(const Output& out) {
  const auto exact = qlora::nf4_levels_exact();
  const auto recipe = qlora::nf4_levels_bitsandbytes_recipe();
  Table t{{"code", "probability", "quantile", "value_double", "value_float32_recipe", "bitsandbytes", "diff_double"}, {}};
  double max_diff = 0.0;
  int recipe_equal = 0;
  for (int c = 0; c < 16; ++c) {
    const double d = exact[c].value - qlora::nf4_table[c];
    max_diff = std::max(max_diff, std::fabs(d));
    recipe_equal += recipe[c] == qlora::nf4_table[c];
    t.rows.push_back({c, exact[c].probability, exact[c].quantile, exact[c].value, recipe[c], qlora::nf4_table[c], d});
  }
  emit(out, t,
       {{"offset", qlora::nf4_offset},
        {"max_abs_diff_double_vs_bitsandbytes", max_diff},
        {"float32_recipe_equal_codes", recipe_equal}});
}

void table_levels(const Output& out) {
  Table t{{"format", "code", "value"}, {}};
  for (int c = 0; c < 16; ++c) t.rows.push_back({"nf4", c, qlora::nf4_table[c]});
  for (int c = 0; c < 16; ++c) t.rows.push_back({"fp4", c, qlora::fp4_table[c]});
  for (int q = -7; q <= 7; ++q) t.rows.push_back({"int4", q, q / 7.0});
  emit(out, t);
}

struct ErrorArgs {
  int blocksize = 64;
  int blocks = 4096;
  std::uint32_t seed = 1234;
  int bins = 68;
};

void table_error(const Output& out, const ErrorArgs& a) {
  check_blocksize_flag(a.blocksize);
  if (a.blocks < 1) throw std::invalid_argument("--blocks must be positive");
  if (a.bins < 1) throw std::invalid_argument("--bins must be positive");
  const auto n = static_cast<std::size_t>(a.blocks) * static_cast<std::size_t>(a.blocksize);
  const auto x = qlora::normal_samples(n, a.seed);
  // Block absmax, to express each error as a fraction of its block's scale.
  std::vector<float> absmax(static_cast<std::size_t>(a.blocks), 0.0f);
  for (std::size_t i = 0; i < n; ++i) {
    auto& m = absmax[i / static_cast<std::size_t>(a.blocksize)];
    m = std::max(m, std::fabs(x[i]));
  }
  Table t{{"format", "rmse", "max_abs", "rel_frobenius"}, {}};
  json hist = json::object();
  const double range = 0.17;  // just above FP4's largest half gap (1/6)
  for (const auto& f : qlora::four_bit_formats) {
    const auto r = qlora::roundtrip_4bit(x, f, a.blocksize);
    const auto s = qlora::compare(x, r);
    t.rows.push_back({f, s.rmse, s.max_abs, s.rel_frobenius});
    std::vector<long long> counts(static_cast<std::size_t>(a.bins), 0);
    for (std::size_t i = 0; i < n; ++i) {
      const double e = (double{r[i]} - x[i]) / absmax[i / static_cast<std::size_t>(a.blocksize)];
      auto k = static_cast<long long>(std::floor((e + range) / (2 * range) * a.bins));
      counts[static_cast<std::size_t>(std::clamp(k, 0LL, static_cast<long long>(a.bins) - 1))]++;
    }
    hist[f] = counts;
  }
  emit(out, t,
       {{"blocksize", a.blocksize},
        {"blocks", a.blocks},
        {"seed", a.seed},
        {"histogram_range", range},
        {"histogram_of_error_over_block_absmax", hist}});
}

struct OutlierArgs {
  int n = 4096;
  float outlier = 50.0f;
  std::uint32_t seed = 1234;
  int blocksize = 64;
};

void table_outliers(const Output& out, const OutlierArgs& a) {
  check_blocksize_flag(a.blocksize);
  if (a.n < 2) throw std::invalid_argument("--n must be at least 2");
  const auto rows = qlora::outlier_experiment(static_cast<std::size_t>(a.n), a.outlier, a.seed, a.blocksize);
  Table t{{"scheme", "rmse_without", "rmse_with", "rel_frobenius_without", "rel_frobenius_with"}, {}};
  for (const auto& r : rows) {
    t.rows.push_back({r.scheme, r.without.rmse, r.with.rmse, r.without.rel_frobenius, r.with.rel_frobenius});
  }
  emit(out, t, {{"n", a.n}, {"outlier", a.outlier}, {"seed", a.seed}, {"blocksize", a.blocksize}});
}

struct BitsArgs {
  long long numel = 64LL * 256 * 64;
  int blocksize = 64;
  double params = 65e9;
  std::uint32_t seed = 1234;
};

void table_bits(const Output& out, const BitsArgs& a) {
  check_blocksize_flag(a.blocksize);
  if (a.numel < 1) throw std::invalid_argument("--numel must be positive");
  const auto rows = qlora::bits_experiment(a.numel, a.blocksize, a.seed);
  Table t{{"double_quant", "numel", "stored_bytes", "bits_per_parameter", "formula"}, {}};
  for (const auto& r : rows) t.rows.push_back({r.double_quant, r.numel, r.storage_bytes, r.bits_per_parameter, r.formula});
  const double saved = rows[0].bits_per_parameter - rows[1].bits_per_parameter;
  emit(out, t,
       {{"blocksize", a.blocksize},
        {"bits_saved_per_parameter", saved},
        {"model_parameters", a.params},
        {"saving_gb", qlora::saving_gb(a.params, saved)}});
}

void table_dynamic(const Output& out) {
  Table t{{"index", "signed", "unsigned"}, {}};
  const auto s = qlora::dynamic_map(true);
  const auto u = qlora::dynamic_map(false);
  for (int i = 0; i < 256; ++i) t.rows.push_back({i, s[i], u[i]});
  emit(out, t);
}

}  // namespace

QLORA_COMMAND([](CLI::App& app) {
  auto* tables = app.add_subcommand(
      "tables",
      "Chapters 1-3: print the numbers the chapters state (NF4 derivation, 4-bit error comparison,\n"
      "outlier effect, bits per parameter, dynamic map) as text, JSON or CSV");
  tables->require_subcommand(1);

  auto o_nf4 = std::make_shared<Output>();
  auto* nf4 = tables->add_subcommand("nf4", "Chapter 2: NF4 from normal quantiles vs bitsandbytes' table");
  add_format(nf4, *o_nf4);
  nf4->callback([o_nf4] { table_nf4(*o_nf4); });

  auto o_levels = std::make_shared<Output>();
  auto* levels = tables->add_subcommand("levels", "Chapters 1-2: the values of NF4, FP4 and Int4 (absmax = 1)");
  add_format(levels, *o_levels);
  levels->callback([o_levels] { table_levels(*o_levels); });

  auto o_err = std::make_shared<Output>();
  auto a_err = std::make_shared<ErrorArgs>();
  auto* err = tables->add_subcommand(
      "error", "Chapter 2: NF4 vs FP4 vs Int4 round-trip error on N(0,1) blocks (+ error histograms in JSON)");
  add_format(err, *o_err);
  err->add_option("--blocksize", a_err->blocksize, "values per block")->capture_default_str();
  err->add_option("--blocks", a_err->blocks, "number of blocks")->capture_default_str();
  err->add_option("--seed", a_err->seed, "random seed (std::mt19937)")->capture_default_str();
  err->add_option("--bins", a_err->bins, "histogram bins")->capture_default_str();
  err->callback([o_err, a_err] { table_error(*o_err, *a_err); });

  auto o_out = std::make_shared<Output>();
  auto a_out = std::make_shared<OutlierArgs>();
  auto* outl = tables->add_subcommand(
      "outliers", "Chapter 1: error on ordinary values with one outlier, tensor-wide vs blockwise absmax");
  add_format(outl, *o_out);
  outl->add_option("--n", a_out->n, "tensor size")->capture_default_str();
  outl->add_option("--outlier", a_out->outlier, "value of the single outlier (the others are N(0,1))")
      ->capture_default_str();
  outl->add_option("--seed", a_out->seed, "random seed")->capture_default_str();
  outl->add_option("--blocksize", a_out->blocksize, "block size of the blockwise schemes")->capture_default_str();
  outl->callback([o_out, a_out] { table_outliers(*o_out, *a_out); });

  auto o_bits = std::make_shared<Output>();
  auto a_bits = std::make_shared<BitsArgs>();
  auto* bits = tables->add_subcommand(
      "bits", "Chapter 3: bits/parameter from the stored bytes of an NF4 tensor, with and without DQ");
  add_format(bits, *o_bits);
  bits->add_option("--numel", a_bits->numel, "tensor size")->capture_default_str();
  bits->add_option("--blocksize", a_bits->blocksize, "values per block")->capture_default_str();
  bits->add_option("--params", a_bits->params, "model size for the saving in GB")->capture_default_str();
  bits->add_option("--seed", a_bits->seed, "random seed")->capture_default_str();
  bits->callback([o_bits, a_bits] { table_bits(*o_bits, *a_bits); });

  auto o_dyn = std::make_shared<Output>();
  auto* dyn = tables->add_subcommand("dynamic", "Chapter 3: the 256 values of the signed and unsigned dynamic maps");
  add_format(dyn, *o_dyn);
  dyn->callback([o_dyn] { table_dynamic(*o_dyn); });
});
