// The run folder of `moe train`: creating it, writing files atomically, and calling the
// plotting script.
#pragma once
#include <string>

namespace moe::cli {

// `out` when given (created if missing), else a fresh runs/YYYYmmdd-HHMMSS[-N] under the
// current directory. Returns the folder's path.
std::string make_run_dir(const std::string& out);

// Writes text to path through a temporary file in the same folder and a rename, so that a
// reader never sees half a file. Throws std::runtime_error on an I/O failure.
void write_file_atomic(const std::string& path, const std::string& text);

// The Python interpreter for the helper scripts (plots, benchmark peers): $MOE_PYTHON when
// set; for the build tree's moe, the project's environment .venv/bin/python of its source
// tree (scripts/setup.sh makes it, with matplotlib and torch); for an installed moe, the
// python3 beside it (a virtual environment's bin/); else /usr/bin/python3, else python3.
std::string project_python();

// share/libmoe beside the executable's bin/ folder: the helper scripts moe runs (the build
// tree's copy, an install's or a wheel's), so that nothing needs the source tree.
std::string resource_dir();

// Runs `project_python() resource_dir()/plot_run.py run_dir` ($MOE_PLOT_SCRIPT overrides).
// Its output goes to our stderr when to_stderr, else to our stdout. Returns a one-line
// description of what happened ("wrote ..." / "skipped: ...").
struct PlotResult {
  bool ok = false;
  std::string message;
};
PlotResult run_plot_script(const std::string& run_dir, bool to_stderr);

}  // namespace moe::cli
