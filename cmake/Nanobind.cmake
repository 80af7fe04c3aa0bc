# Find nanobind through the Python interpreter that drives the build
# (`python -m nanobind --cmake_dir`), then load its CMake package.
if(NOT Python_EXECUTABLE)
  find_package(Python 3.12 REQUIRED COMPONENTS Interpreter Development.Module)
endif()
execute_process(
  COMMAND "${Python_EXECUTABLE}" -m nanobind --cmake_dir
  OUTPUT_VARIABLE nanobind_ROOT
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _nb_rc)
if(NOT _nb_rc EQUAL 0)
  message(FATAL_ERROR "nanobind not found: `${Python_EXECUTABLE} -m nanobind --cmake_dir` failed.")
endif()
find_package(nanobind CONFIG REQUIRED)
