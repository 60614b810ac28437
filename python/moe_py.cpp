#include <pybind11/pybind11.h>
PYBIND11_MODULE(_moe, m) { m.doc() = "libmoe"; }
