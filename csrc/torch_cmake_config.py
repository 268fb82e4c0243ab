"""Print torch's build paths and flags as CMake `set()` lines (read by CMakeLists.txt).

find_package(Torch) needs a full CUDA toolkit, which the CPU-only build machines lack; torch's
own cpp_extension knows the include and library paths, so CMake asks it through this script.
Usage: python torch_cmake_config.py cpu|cuda > torch_paths.cmake
"""
import sys

import torch
import torch.utils.cpp_extension as cpp_extension


def main() -> None:
    device = sys.argv[1]
    values = {
        "TORCH_INCLUDE_DIRS": ";".join(cpp_extension.include_paths(device_type=device)),
        "TORCH_LIBRARY_DIRS": ";".join(cpp_extension.library_paths(device_type=device)),
        "TORCH_CXX11_ABI": str(int(torch.compiled_with_cxx11_abi())),
        "TORCH_VERSION_STRING": torch.__version__,
    }
    for name, value in values.items():
        print(f'set({name} "{value}")')


if __name__ == "__main__":
    main()
