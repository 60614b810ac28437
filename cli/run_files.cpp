#include "run_files.hpp"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <stdexcept>
#include <vector>

#include "common/check.hpp"

namespace fs = std::filesystem;

namespace moe::cli {

namespace {

[[noreturn]] void io_fail(const std::string& what, const std::string& path) {
  throw std::runtime_error(what + " '" + path + "': " + std::strerror(errno));
}

// The folder of the running executable, "" when /proc/self/exe cannot be read.
std::string exe_dir() {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  return ec ? std::string() : exe.parent_path().string();
}

// A build tree's bin/ sits beside its CMakeCache.txt; an installed moe's does not.
[[maybe_unused]] bool running_from_build_tree() {
  const std::string dir = exe_dir();
  return !dir.empty() && fs::exists(fs::path(dir) / ".." / "CMakeCache.txt");
}

std::string find_plot_script() {
  if (const char* env = std::getenv("MOE_PLOT_SCRIPT")) return env;
  return resource_dir() + "/plot_run.py";
}

}  // namespace

std::string resource_dir() {
  // What moe runs travels with it: build/share/libmoe (copied there at configure time), an
  // install's PREFIX/share/libmoe, a wheel's environment share/libmoe; never the source
  // tree, which an installed moe must not need.
  const std::string dir = exe_dir();
  return dir.empty() ? std::string("share/libmoe")
                     : (fs::path(dir).parent_path() / "share" / "libmoe").string();
}

std::string project_python() {
  if (const char* env = std::getenv("MOE_PYTHON"); env && *env) return env;
#ifdef MOE_SOURCE_DIR
  // The build tree's moe uses the project environment of its source tree.
  if (running_from_build_tree()) {
    const std::string venv = std::string(MOE_SOURCE_DIR) + "/.venv/bin/python";
    if (::access(venv.c_str(), X_OK) == 0) return venv;
  }
#endif
  // An installed moe: the python3 beside it (the virtual environment pip installed it into).
  if (const std::string dir = exe_dir(); !dir.empty()) {
    const std::string sibling = dir + "/python3";
    if (::access(sibling.c_str(), X_OK) == 0) return sibling;
  }
  return ::access("/usr/bin/python3", X_OK) == 0 ? "/usr/bin/python3" : "python3";
}

std::string make_run_dir(const std::string& out) {
  std::error_code ec;
  if (!out.empty()) {
    fs::create_directories(out, ec);
    if (ec || !fs::is_directory(out))
      throw std::runtime_error("out: cannot create folder '" + out + "': " + ec.message());
    return out;
  }
  char stamp[32];
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  std::strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", &tm);
  fs::create_directories("runs", ec);
  for (int n = 0; n < 1000; ++n) {
    std::string dir = n ? detail::cat("runs/", stamp, '-', n) : detail::cat("runs/", stamp);
    // create_directory reports false when it exists already: that is how "fresh" is ensured.
    if (fs::create_directory(dir, ec)) return dir;
    if (ec) throw std::runtime_error("out: cannot create folder '" + dir + "': " + ec.message());
  }
  throw std::runtime_error("out: no fresh folder name under runs/");
}

void write_file_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) io_fail("cannot create", tmp);
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int e = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      errno = e;
      io_fail("cannot write", tmp);
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    errno = e;
    io_fail("cannot write", tmp);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    errno = e;
    io_fail("cannot rename to", path);
  }
}

PlotResult run_plot_script(const std::string& run_dir, bool to_stderr) {
  const std::string script = find_plot_script();
  if (!fs::exists(script)) return {false, "skipped: " + script + " not found"};
  const std::string python_path = project_python();
  const char* python = python_path.c_str();
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = ::fork();
  if (pid < 0) return {false, std::string("skipped: cannot start python: ") + std::strerror(errno)};
  if (pid == 0) {
    if (to_stderr) ::dup2(2, 1);
    std::vector<char*> argv{const_cast<char*>(python), const_cast<char*>(script.c_str()),
                            const_cast<char*>(run_dir.c_str()), nullptr};
    ::execvp(python, argv.data());
    std::fprintf(stderr, "moe train: cannot run %s: %s\n", python, std::strerror(errno));
    ::_exit(127);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (!WIFEXITED(status)) return {false, "skipped: the plotting script crashed"};
  switch (WEXITSTATUS(status)) {
    case 0:
      return {true, "written by " + script};
    case 3:
      return {false, "skipped: matplotlib is not installed for " + std::string(python)};
    case 127:
      return {false, std::string("skipped: ") + python + " not found"};
    default:
      return {false, "skipped: " + script + " failed with status " +
                         std::to_string(WEXITSTATUS(status))};
  }
}

}  // namespace moe::cli
