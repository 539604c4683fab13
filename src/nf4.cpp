// NF4 from normal quantiles (chapter 2). See nf4.hpp.
#include "nf4.hpp"

#include "quant_basics.hpp"

#include <algorithm>
#include <boost/math/distributions/normal.hpp>

namespace qlora {

//! [nf4-table]
const std::array<float, 16> nf4_table = {
    -1.0f,                 -0.6961928009986877f,  -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f,  0.16093020141124725f,  0.24611230194568634f,  0.33791524171829224f,
    0.44070982933044434f,  0.5626170039176941f,   0.7229568362236023f,   1.0f};
//! [nf4-table]

//! [nf4-derivation]
std::array<NF4Level, 16> nf4_levels_exact(double offset) {
  const boost::math::normal standard_normal;  // mean 0, sd 1
  std::array<NF4Level, 16> levels{};
  std::size_t k = 0;
  // 8 positive levels: linspace(offset, 0.5, 9) without its last point (0.5 would give 0).
  for (int i = 0; i < 8; ++i) {
    const double p = offset + (0.5 - offset) * i / 8.0;
    levels[k++] = {p, boost::math::quantile(standard_normal, p), 0.0};
  }
  // 7 negative levels: linspace(offset, 0.5, 8) without its last point, mirrored.
  for (int i = 0; i < 7; ++i) {
    const double p = offset + (0.5 - offset) * i / 7.0;
    levels[k++] = {p, -boost::math::quantile(standard_normal, p), 0.0};
  }
  levels[k] = {0.5, 0.0, 0.0};  // the exact zero
  std::sort(levels.begin(), levels.end(), [](const NF4Level& a, const NF4Level& b) { return a.quantile < b.quantile; });
  const double top = levels.back().quantile;  // Φ⁻¹(offset), the largest magnitude
  for (auto& l : levels) l.value = l.quantile / top;
  return levels;
}
//! [nf4-derivation]

//! [nf4-recipe]
std::array<float, 16> nf4_levels_bitsandbytes_recipe(double offset) {
  // create_normal_map: norm.ppf(torch.linspace(offset, 0.5, 9)[:-1]) etc. The
  // probabilities are float32 (torch's default dtype), scipy evaluates Φ⁻¹ in double,
  // torch.Tensor(v) rounds to float32, and `values /= values.max()` divides in float32.
  const boost::math::normal standard_normal;
  const auto p_pos = torch_linspace_f32(static_cast<float>(offset), 0.5f, 9);
  const auto p_neg = torch_linspace_f32(static_cast<float>(offset), 0.5f, 8);
  std::array<float, 16> v{};
  std::size_t k = 0;
  for (int i = 0; i < 8; ++i) v[k++] = static_cast<float>(boost::math::quantile(standard_normal, double{p_pos[i]}));
  for (int i = 0; i < 7; ++i) v[k++] = static_cast<float>(-boost::math::quantile(standard_normal, double{p_neg[i]}));
  v[k] = 0.0f;
  std::sort(v.begin(), v.end());
  const float top = v.back();
  for (auto& x : v) x /= top;
  return v;
}
//! [nf4-recipe]

// Midpoints of neighbouring table values, as the float literals of bitsandbytes'
// decision tree (its test_normal_map_tree generated them).
const std::array<float, 15> nf4_thresholds = {
    -0.8480964004993439f,  -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
    -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
    0.1202552504837513f,   0.2035212516784668f,  0.2920137718319893f,  0.3893125355243683f,
    0.5016634166240692f,   0.6427869200706482f,  0.8614784181118011f};

//! [nf4-encode]
std::uint8_t nf4_encode(float x) {
  // Four comparisons walk a balanced tree over the 15 midpoints t[0] < ... < t[14]:
  // code c is chosen when t[c-1] < x <= t[c]. A value exactly on a midpoint goes down.
  const auto& t = nf4_thresholds;
  if (x > t[7]) {
    if (x > t[11]) {
      if (x > t[13]) return x > t[14] ? 0b1111 : 0b1110;
      return x > t[12] ? 0b1101 : 0b1100;
    }
    if (x > t[9]) return x > t[10] ? 0b1011 : 0b1010;
    return x > t[8] ? 0b1001 : 0b1000;
  }
  if (x > t[3]) {
    if (x > t[5]) return x > t[6] ? 0b0111 : 0b0110;
    return x > t[4] ? 0b0101 : 0b0100;
  }
  if (x > t[1]) return x > t[2] ? 0b0011 : 0b0010;
  return x > t[0] ? 0b0001 : 0b0000;
}
//! [nf4-encode]

}  // namespace qlora
