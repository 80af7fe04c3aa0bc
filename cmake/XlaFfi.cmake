# Locate the XLA FFI headers shipped inside the installed jaxlib wheel.
# Defines the INTERFACE target `xla_ffi_headers`.
if(TARGET xla_ffi_headers)
  return()
endif()
if(NOT Python_EXECUTABLE)
  find_package(Python 3.12 REQUIRED COMPONENTS Interpreter Development.Module)
endif()
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import jax; print(jax.ffi.include_dir())"
  OUTPUT_VARIABLE XLA_FFI_INCLUDE_DIR
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _xla_ffi_rc)
if(NOT _xla_ffi_rc EQUAL 0 OR NOT EXISTS "${XLA_FFI_INCLUDE_DIR}/xla/ffi/api/ffi.h")
  message(FATAL_ERROR "XLA FFI headers not found: `import jax; jax.ffi.include_dir()` failed "
                      "for ${Python_EXECUTABLE}. Install jax into the build environment.")
endif()
message(STATUS "XLA FFI headers: ${XLA_FFI_INCLUDE_DIR}")
add_library(xla_ffi_headers INTERFACE)
target_include_directories(xla_ffi_headers SYSTEM INTERFACE "${XLA_FFI_INCLUDE_DIR}")
