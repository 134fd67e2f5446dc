# Helpers for fastgen's CMakeLists.txt. Each one is small and documented with an example.

# fastgen_use_ccache()
#   Route C++ and CUDA compiles through ccache when it is installed; rebuilds then cost seconds.
#   Example: fastgen_use_ccache()
function(fastgen_use_ccache)
  find_program(CCACHE_PROGRAM ccache)
  if(CCACHE_PROGRAM)
    message(STATUS "fastgen: using ccache (${CCACHE_PROGRAM})")
    set(CMAKE_CXX_COMPILER_LAUNCHER "${CCACHE_PROGRAM}" PARENT_SCOPE)
    set(CMAKE_CUDA_COMPILER_LAUNCHER "${CCACHE_PROGRAM}" PARENT_SCOPE)
  endif()
endfunction()

# fastgen_cpu_flags(<target> NATIVE <ON|OFF>)
#   Optimisation flags for the C++ kernels. NATIVE ON adds -march=native (AVX-512 / AVX2 where the
#   building machine has them), as llama.cpp does by default; turn it off for a portable build.
#   CPU kernels parallelise with at::parallel_for, on torch's thread pool. With torch's OpenMP
#   backend (the pip wheels' default) at::parallel_for is an inline `#pragma omp parallel` in
#   ATen/ParallelOpenMP.h, so the kernels must be compiled with OpenMP: without it the pragma is
#   dropped and every parallel_for runs on one thread. The runtime is torch's own libgomp.
#   Example: fastgen_cpu_flags(fastgen_kernels NATIVE ON)
function(fastgen_cpu_flags target)
  cmake_parse_arguments(ARG "" "NATIVE" "" ${ARGN})
  set(flags -O3 -Wall -Wno-unused-function)
  if(ARG_NATIVE)
    list(APPEND flags -march=native)
  endif()
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${flags}>)
  find_package(OpenMP REQUIRED COMPONENTS CXX)
  target_link_libraries(${target} PUBLIC OpenMP::OpenMP_CXX)
endfunction()

# fastgen_cuda_flags(<target>)
#   nvcc flags for the CUDA kernels: fast math off (numerics are tested against fp32 references),
#   line info for profilers, relaxed constexpr for the bf16/fp16 helpers.
#   Example: fastgen_cuda_flags(fastgen_kernels)
function(fastgen_cuda_flags target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo --expt-relaxed-constexpr -Xcompiler=-fPIC>)
endfunction()

# fastgen_find_wheel_cuda_libs()
#   torch's CUDA wheels carry nvrtc (and NCCL) in site-packages/nvidia/..., beside torch itself,
#   not in the toolkit's lib64; torch's CMake config links nvrtc, so point it there before
#   find_package(Torch). Looks beside FASTGEN_TORCH_DIR (the torch being built against, which may
#   live in pip's isolated build environment rather than the interpreter's site-packages).
#   Sets CUDA_nvrtc_LIBRARY and FASTGEN_NCCL_ROOT when found.
#   Example: fastgen_find_wheel_cuda_libs()
function(fastgen_find_wheel_cuda_libs)
  get_filename_component(torch_site "${FASTGEN_TORCH_DIR}/.." ABSOLUTE)
  file(GLOB wheel_lib_dirs "${torch_site}/nvidia/*/lib" "${Python_SITELIB}/nvidia/*/lib")
  find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12
               HINTS ${CUDAToolkit_ROOT}/lib64 ${wheel_lib_dirs})
  foreach(site IN ITEMS "${torch_site}" "${Python_SITELIB}")
    if(NOT FASTGEN_NCCL_ROOT AND EXISTS "${site}/nvidia/nccl/include/nccl.h")
      set(FASTGEN_NCCL_ROOT "${site}/nvidia/nccl" CACHE PATH "NCCL from torch's wheel")
    endif()
  endforeach()
endfunction()

# fastgen_torch_cpu_target(<name>)
#   An INTERFACE target with torch's headers and CPU libraries (from FASTGEN_TORCH_DIR), for
#   CPU-only builds. torch's own CMake config (find_package(Torch)) insists on a CUDA toolkit
#   whenever torch is a CUDA build, even when nothing here is compiled for CUDA.
#   Call after find_package(Python). Example: fastgen_torch_cpu_target(fastgen_torch)
function(fastgen_torch_cpu_target name)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
    OUTPUT_VARIABLE cxx11_abi OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
  set(torch_dir "${FASTGEN_TORCH_DIR}")
  find_library(FASTGEN_TORCH_CPU_LIB torch_cpu PATHS "${torch_dir}/lib" NO_DEFAULT_PATH REQUIRED)
  find_library(FASTGEN_C10_LIB c10 PATHS "${torch_dir}/lib" NO_DEFAULT_PATH REQUIRED)
  add_library(${name} INTERFACE)
  target_include_directories(${name} SYSTEM INTERFACE
    "${torch_dir}/include" "${torch_dir}/include/torch/csrc/api/include")
  target_compile_definitions(${name} INTERFACE _GLIBCXX_USE_CXX11_ABI=${cxx11_abi})
  target_link_libraries(${name} INTERFACE "${FASTGEN_TORCH_CPU_LIB}" "${FASTGEN_C10_LIB}")
  set_target_properties(${name} PROPERTIES INTERFACE_LINK_OPTIONS "-Wl,-rpath,${torch_dir}/lib")
endfunction()
