// Runs a nestsparse model compiled ahead of time (nestsparse.export, then torch._inductor.aoti_compile_and_package)
// at several levels, with libtorch and the nestsparse op library only: no Python in the process.
//
//   run_levels <libnestsparse.so> <model.pt2> <input.f32> <dims, e.g. 2,3,32,32> <out_prefix> <level>...
//
// The input is raw float32 (C order) of the given shape. Each level's output is written raw to
// <out_prefix><level>.f32 and its shape and sum printed. The exported program's first input is the level
// (a 0-dim int64 tensor), so one compiled model serves every level.
//
// The program checks itself before its first result (nestsparse.export made nestsparse::verified_level its first
// step): a level out of range, or a package whose constants are not the bytes nestsparse.export recorded (a
// damaged or edited file), raises with a message that names the level and the range, or the constant. This
// program prints that message and exits with status 1, before any output is written.
#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::vector<int64_t> parse_dims(const std::string& text) {
  std::vector<int64_t> dims;
  std::stringstream in(text);
  for (std::string part; std::getline(in, part, ',');) dims.push_back(std::stoll(part));
  return dims;
}

torch::Tensor read_f32(const std::string& path, const std::vector<int64_t>& dims) {
  auto x = torch::empty(dims, torch::kFloat32);
  std::ifstream in(path, std::ios::binary);
  in.read(reinterpret_cast<char*>(x.data_ptr<float>()), static_cast<std::streamsize>(x.nbytes()));
  if (!in || in.gcount() != static_cast<std::streamsize>(x.nbytes()))
    throw std::runtime_error(path + ": fewer bytes than the shape needs");
  return x;
}

void write_f32(const std::string& path, const torch::Tensor& y) {
  const auto c = y.contiguous().to(torch::kFloat32);
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(c.data_ptr<float>()), static_cast<std::streamsize>(c.nbytes()));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 7) {
    std::cerr << "usage: " << argv[0] << " <libnestsparse.so> <model.pt2> <input.f32> <dims> <out_prefix> <level>...\n";
    return 2;
  }
  // Loading the op library registers the nestsparse ops with the dispatcher, as torch.ops.load_library does.
  if (!dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL)) {
    std::cerr << "cannot load " << argv[1] << ": " << dlerror() << "\n";
    return 1;
  }
  try {
    torch::NoGradGuard no_grad;
    torch::inductor::AOTIModelPackageLoader model(argv[2]);
    const auto x = read_f32(argv[3], parse_dims(argv[4]));
    for (int i = 6; i < argc; ++i) {
      const int64_t level = std::stoll(argv[i]);
      const auto out = model.run({torch::scalar_tensor(level, torch::kInt64), x});
      const auto& y = out.at(0);
      write_f32(std::string(argv[5]) + std::to_string(level) + ".f32", y);
      std::cout << "level " << level << ": output " << y.sizes() << ", sum " << y.sum().item<double>() << "\n";
    }
  } catch (const std::exception& e) {
    // An op's error (the program's checks included) reaches here through the AOTInductor runner with the C++ trace
    // appended after its first line: the message is that line.
    const std::string what = e.what();
    std::cerr << "run_levels: " << what.substr(0, what.find('\n')) << "\n";
    return 1;
  }
  return 0;
}
