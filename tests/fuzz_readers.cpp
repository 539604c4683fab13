// A libFuzzer harness for every reader of a file that comes from outside: safetensors
// (and the 4-bit tensors stored in it, chapter 3), llama2c checkpoints and tokenizer.bin
// files, Hugging Face LLaMA folders (chapter 7) and PEFT adapter folders (chapter 4).
// The rule it checks is the project's: a bad file gives a std::exception with a clear
// message, never a crash, an out-of-bounds access or undefined behaviour (the build adds
// AddressSanitizer and UBSan). Built only with -DQLORA_FUZZ=ON and clang (the `fuzz`
// preset); the seed corpus comes from tools/make_fuzz_corpus.py. Usage in chapter 7,
// "Files from outside".
#include "hf_llama.hpp"
#include "llama2c.hpp"
#include "peft_adapter.hpp"
#include "quant4_file.hpp"
#include "safetensors.hpp"
#include "tokenizer.hpp"

#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>

namespace fs = std::filesystem;

namespace {

// The readers take paths, so each input is written to a per-process folder in memory.
const fs::path& scratch() {
  static const fs::path dir = [] {
    fs::path d = fs::is_directory("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path();
    d /= "qlora_fuzz_" + std::to_string(::getpid());
    fs::create_directories(d);
    return d;
  }();
  return dir;
}

void put(const fs::path& p, const std::uint8_t* data, std::size_t n) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(n));
}

// A folder of two files: the first half of the input is the JSON, the second the safetensors.
fs::path two_file_folder(const char* name, const char* json, const char* tensors, const std::uint8_t* data,
                         std::size_t n) {
  const fs::path dir = scratch() / name;
  fs::create_directories(dir);
  put(dir / json, data, n / 2);
  put(dir / tensors, data + n / 2, n - n / 2);
  return dir;
}

}  // namespace

// The first byte picks the reader; the rest is the file.
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const int reader = data[0] % 5;
  ++data;
  --size;
  try {
    switch (reader) {
      case 0: {
        const fs::path p = scratch() / "model.safetensors";
        put(p, data, size);
        const qlora::SafeTensors st = qlora::read_safetensors(p);
        for (const std::string& name : qlora::quant4_names(st)) {
          try {
            (void)qlora::get_quant4(st, name, p.string());
          } catch (const std::exception&) {  // one bad 4-bit tensor must not hide the others
          }
        }
        break;
      }
      case 1: {
        const fs::path p = scratch() / "model.bin";
        put(p, data, size);
        (void)qlora::read_llama2c(p);
        break;
      }
      case 2:
        (void)qlora::read_peft_adapter(
            two_file_folder("adapter", "adapter_config.json", "adapter_model.safetensors", data, size));
        break;
      case 3: {
        const fs::path p = scratch() / "tokenizer.bin";
        put(p, data, size);
        (void)qlora::load_tokenizer(p);
        break;
      }
      default:
        (void)qlora::read_hf_llama(two_file_folder("hf", "config.json", "model.safetensors", data, size));
        break;
    }
  } catch (const std::exception&) {  // a clear error is the right answer to a bad file
  }
  return 0;
}
