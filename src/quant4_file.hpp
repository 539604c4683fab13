// The 4-bit file format (chapter 3): a Quant4Tensor stored inside a safetensors
// file exactly as bitsandbytes' Params4bit / QuantState.as_dict(packed=True) and
// transformers save it. For a tensor X:
//   X                                   U8  [(numel + 1) / 2, 1]  packed codes, first element high nibble
//   X.absmax                            F32 [blocks]  (with double quantization: U8 codes [blocks])
//   X.quant_map                         F32 [16]      the NF4 or FP4 table
//   X.nested_absmax                     F32 [ceil(blocks / 256)]   (double quantization only)
//   X.nested_quant_map                  F32 [256]     the signed dynamic map (double quantization only)
//   X.quant_state.bitsandbytes__nf4     U8  [len]     UTF-8 JSON, as Python's json.dumps writes it:
//       {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [288, 288]
//        [, "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0123]}
//   (…bitsandbytes__fp4 for FP4). "dtype" is the torch dtype the tensor was quantized from.
// Reading validates every part against the others and throws std::runtime_error
// naming the file and the tensor.
#pragma once

#include "quant4.hpp"
#include "safetensors.hpp"

#include <string>
#include <vector>

namespace qlora {

/// torch's name for a floating dtype as bitsandbytes writes it: "bfloat16", "float16", "float32".
std::string torch_dtype_name(DType d);

/// Python's repr() of a double (shortest round-trip digits, "1e-05" style exponents),
/// which is what json.dumps writes for a float.
std::string python_float_repr(double v);

/// The JSON text bitsandbytes stores in X.quant_state.bitsandbytes__nf4 (or __fp4).
std::string quant_state_json(const Quant4Tensor& q, DType original_dtype);

/// Adds the parts of q under the name `name` to st (overwriting any present).
void put_quant4(SafeTensors& st, const std::string& name, const Quant4Tensor& q, DType original_dtype);

/// A 4-bit tensor read back, with the dtype it was quantized from.
struct StoredQuant4 {
  Quant4Tensor q;
  DType dtype = DType::BF16;
};

/// Names X of the 4-bit tensors in st (those with an X.quant_state.bitsandbytes__* part), sorted.
std::vector<std::string> quant4_names(const SafeTensors& st);

/// Whether `tensor` is one of the parts put_quant4 writes for some 4-bit tensor of st.
bool is_quant4_part(const SafeTensors& st, const std::string& tensor);

/// Reads the 4-bit tensor `name` back, validating every part; `file` names the source
/// in error messages.
StoredQuant4 get_quant4(const SafeTensors& st, const std::string& name, const std::string& file);

}  // namespace qlora
