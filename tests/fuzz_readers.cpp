// A libFuzzer harness for every reader of a file that comes from outside: safetensors
// (and the 4-bit tensors stored in it, chapter 3), llama2c checkpoints and tokenizer.bin
// files, Hugging Face LLaMA folders (chapter 7) and PEFT adapter folders (chapter 4).
// The rule it checks is the project's: a bad file gives a std::exception with a clear
// message, never a crash, an out-of-bounds access or undefined behaviour (the build adds
// AddressSanitizer and UBSan). With -DQLORA_FUZZ=ON and clang (the `fuzz` preset) it is
// a libFuzzer binary; in every other build it replays the files named on its command
// line, and CTest replays the seed corpus of tools/make_fuzz_corpus.py, each seed of
// which must be read (so the seeds stay valid files as the readers change). Usage in
// chapter 7, "Files from outside".
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
#include <iostream>
#include <iterator>
#include <string>
#include <unistd.h>
#include <vector>

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

// The first byte picks the reader; the rest is the file (for tokenizer.bin, after a byte
// that gives the vocabulary size). Returns "" when the file was read,
// else the message of the exception that refused it (the right answer to a bad file).
std::string read_one(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return "empty input";
  const int reader = data[0] % 5;
  ++data;
  --size;
  try {
    switch (reader) {
      case 0: {
        const fs::path p = scratch() / "model.safetensors";
        put(p, data, size);
        const qlora::SafeTensors st = qlora::read_safetensors(p);
        std::string first_error;
        for (const std::string& name : qlora::quant4_names(st)) {
          try {
            (void)qlora::get_quant4(st, name, p.string());
          } catch (const std::exception& e) {  // one bad 4-bit tensor must not hide the others
            if (first_error.empty()) first_error = e.what();
          }
        }
        return first_error;
      }
      case 1: {
        const fs::path p = scratch() / "model.bin";
        put(p, data, size);
        (void)qlora::read_llama2c(p);
        return {};
      }
      case 2:
        (void)qlora::read_peft_adapter(
            two_file_folder("adapter", "adapter_config.json", "adapter_model.safetensors", data, size));
        return {};
      case 3: {  // the file does not store its vocabulary size: the next byte gives it (1..64)
        if (size == 0) return "no vocabulary size";
        const int vocab = 1 + data[0] % 64;
        const fs::path p = scratch() / "tokenizer.bin";
        put(p, data + 1, size - 1);
        (void)qlora::Llama2cTokenizer(p, vocab);
        return {};
      }
      default:
        (void)qlora::read_hf_llama(two_file_folder("hf", "config.json", "model.safetensors", data, size));
        return {};
    }
  } catch (const std::exception& e) {
    return e.what();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  (void)read_one(data, size);
  return 0;
}

#ifndef QLORA_LIBFUZZER
// Replay: fuzz_readers [--expect-read] FILE...; with --expect-read every file must be read.
int main(int argc, char** argv) {
  bool expect_read = false;
  int read = 0, refused = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--expect-read") {
      expect_read = true;
      continue;
    }
    std::ifstream in(arg, std::ios::binary);
    if (!in) {
      std::cerr << "fuzz_readers: cannot read " << arg << "\n";
      return 2;
    }
    const std::vector<std::uint8_t> bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    const std::string error = read_one(bytes.data(), bytes.size());
    (error.empty() ? read : refused) += 1;
    if (!error.empty() && expect_read) std::cerr << "fuzz_readers: " << arg << " was refused: " << error << "\n";
  }
  std::cout << "fuzz_readers: " << read << " read, " << refused << " refused\n";
  fs::remove_all(scratch());
  return expect_read && refused > 0 ? 1 : 0;
}
#endif
