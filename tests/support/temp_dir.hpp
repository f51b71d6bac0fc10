// tests/support/temp_dir.hpp: a fresh directory under the system temp dir for tests that write
// files (checkpoints, GGUF, runner outputs), removed with everything in it at scope exit.
#pragma once

#include <stdlib.h>

#include <filesystem>
#include <string>
#include <system_error>

#include <catch2/catch.hpp>

namespace rftest {

struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag = "rf-test") {
    std::string t = (std::filesystem::temp_directory_path() / (tag + "-XXXXXX")).string();
    REQUIRE(::mkdtemp(t.data()) != nullptr);
    path = t;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  /// The path of `name` inside the directory.
  std::string file(const std::string& name) const { return (path / name).string(); }
  std::string operator/(const std::string& name) const { return file(name); }
};

}  // namespace rftest
