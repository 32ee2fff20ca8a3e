// sliver's minimal runner for a TVM artifact (model.so) on a device without Python.
//
//   run_model model.so input.bin N,C,H,W output.bin
//
// Loads the Relax VM executable in model.so, runs "main" on one float32 input read from
// input.bin (raw little-endian, the given shape) and writes the first output as raw float32 to
// output.bin, printing its shape. Build for aarch64 against the runtime of the aarch64 wheels of
// apache-tvm and apache-tvm-ffi (see backends/runner/README.md):
//
//   aarch64-linux-gnu-g++ -std=c++17 -O2 run_model.cc -I$TVM/include -I$FFI/include \
//       -L$TVM/lib -L$FFI/lib -ltvm_runtime -ltvm_runtime_extra -ltvm_ffi -o run_model
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

using tvm::ffi::Any;
using tvm::ffi::Function;
using tvm::ffi::Module;
using tvm::ffi::Tensor;

struct CPUAlloc {  // 64-byte aligned host memory, as TVM's kernels expect
  void AllocData(DLTensor* t) { t->data = std::aligned_alloc(64, (tvm::ffi::GetDataSize(*t) + 63) / 64 * 64); }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

static std::vector<int64_t> ParseShape(const std::string& text) {
  std::vector<int64_t> shape;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) shape.push_back(std::stoll(item));
  return shape;
}

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: run_model model.so input.bin N,C,H,W output.bin\n";
    return 2;
  }
  std::vector<int64_t> shape = ParseShape(argv[3]);
  size_t count = 1;
  for (int64_t d : shape) count *= static_cast<size_t>(d);
  std::vector<float> input(count);
  std::ifstream in(argv[2], std::ios::binary);
  in.read(reinterpret_cast<char*>(input.data()), count * sizeof(float));
  if (!in) {
    std::cerr << "error: " << argv[2] << " holds fewer than " << count << " float32 values\n";
    return 2;
  }
  DLDevice cpu{kDLCPU, 0};
  Module lib = Module::LoadFromFile(argv[1]);
  Module vm = lib->GetFunction("vm_load_executable", true).value()().cast<Module>();
  // (device type, device id, allocator: 2 = pooled) as tvm.runtime.vm.VirtualMachine does
  vm->GetFunction("vm_initialization", true).value()(static_cast<int>(kDLCPU), 0, 2);
  Tensor x = Tensor::FromNDAlloc(CPUAlloc(), tvm::ffi::Shape(shape), DLDataType{kDLFloat, 32, 1}, cpu);
  std::memcpy(x.data_ptr(), input.data(), count * sizeof(float));
  Any out = vm->GetFunction("main", true).value()(x);
  Tensor y;
  if (auto t = out.as<Tensor>()) {
    y = t.value();
  } else {
    y = out.cast<tvm::ffi::Array<Any>>()[0].cast<Tensor>();
  }
  size_t n = 1;
  std::cout << "output shape";
  for (int i = 0; i < y.ndim(); ++i) {
    n *= static_cast<size_t>(y.shape()[i]);
    std::cout << (i ? "," : " ") << y.shape()[i];
  }
  std::cout << "\n";
  std::vector<float> result(n);
  std::memcpy(result.data(), static_cast<const char*>(y.data_ptr()) + y.byte_offset(), n * sizeof(float));
  std::ofstream out_file(argv[4], std::ios::binary);
  out_file.write(reinterpret_cast<const char*>(result.data()), n * sizeof(float));
  return 0;
}
