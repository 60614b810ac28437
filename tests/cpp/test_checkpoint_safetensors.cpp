// The safetensors reader and writer on their own: round trips, the exact bytes of the format,
// one test per row of the loader's list of refused files, and atomic saving.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "moe/checkpoint.hpp"
#include "test_checkpoint_util.hpp"

namespace {

using moe::Tensor;
using moe_test::read_bytes;
using moe_test::ScratchDir;
using moe_test::st_bytes;
using moe_test::throws_error_with;
using moe_test::write_bytes;

moe::SafetensorsFile parse(const std::vector<uint8_t>& b) {
  return moe::parse_safetensors(b.data(), b.size(), "test");
}

// Parses a file with the given header and data and expects a moe::Error mentioning `needle`.
::testing::AssertionResult refuses(const std::string& header, const std::vector<uint8_t>& data,
                                   const std::string& needle) {
  const auto b = st_bytes(header, data);
  return throws_error_with([&] { parse(b); }, needle);
}

Tensor filled(std::vector<int64_t> shape, uint32_t seed) {
  Tensor t(std::move(shape));
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  for (float& v : t.data) v = nd(rng);
  return t;
}

void expect_same_bits(const Tensor& a, const Tensor& b) {
  ASSERT_EQ(a.shape, b.shape);
  ASSERT_EQ(a.data.size(), b.data.size());
  for (size_t i = 0; i < a.data.size(); ++i)
    EXPECT_EQ(std::bit_cast<uint32_t>(a.data[i]), std::bit_cast<uint32_t>(b.data[i])) << i;
}

const std::vector<uint8_t> k8Zeros(8, 0);

}  // namespace

TEST(Safetensors, RoundTripsEveryShapeIncludingScalarsAndEmpty) {
  ScratchDir dir;
  std::vector<Tensor> ts = {filled({}, 1),       filled({0}, 2),       filled({5}, 3),
                            filled({2, 3}, 4),   filled({2, 0, 4}, 5), filled({1, 1, 1, 1, 7}, 6),
                            filled({3, 4, 5}, 7)};
  // Values whose bits a careless writer would change: -0, a subnormal, ±inf, a NaN payload.
  ts[2].data = {-0.0f, std::numeric_limits<float>::denorm_min(),
                std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                std::bit_cast<float>(0x7fc01234u)};
  std::vector<std::pair<std::string, const Tensor*>> named;
  for (size_t i = 0; i < ts.size(); ++i) named.emplace_back("t" + std::to_string(i), &ts[i]);
  // Insertion order is not alphabetical on purpose: the file keeps the caller's order.
  std::swap(named[0], named[3]);
  const std::map<std::string, std::string> meta = {{"plain", "value"},
                                                   {"quotes \" and \\ and \n", "ctrl \x01 end"},
                                                   {"unicode", "µ→∑ 😀"},
                                                   {"empty", ""}};
  moe::save_safetensors(dir.file("a.safetensors"), named, meta);

  const auto f = moe::load_safetensors(dir.file("a.safetensors"));
  ASSERT_EQ(f.tensors.size(), named.size());
  for (size_t i = 0; i < named.size(); ++i) {
    EXPECT_EQ(f.tensors[i].name, named[i].first);
    EXPECT_EQ(f.tensors[i].dtype, "F32");
    expect_same_bits(f.tensors[i].tensor, *named[i].second);
  }
  EXPECT_EQ(f.metadata, meta);
  EXPECT_NE(f.find("t6"), nullptr);
  EXPECT_EQ(f.find("nope"), nullptr);
  EXPECT_EQ(dir.listing(), std::vector<std::string>{"a.safetensors"});
}

TEST(Safetensors, NoTensorsAndNoMetadataIsAValidFile) {
  ScratchDir dir;
  moe::save_safetensors(dir.file("e.safetensors"), {});
  const auto bytes = read_bytes(dir.file("e.safetensors"));
  EXPECT_EQ(bytes, st_bytes("{}      "));
  const auto f = moe::load_safetensors(dir.file("e.safetensors"));
  EXPECT_TRUE(f.tensors.empty());
  EXPECT_TRUE(f.metadata.empty());
}

TEST(Safetensors, WritesExactlyTheDocumentedBytes) {
  ScratchDir dir;
  Tensor a({2});
  a.data = {1.0f, -2.0f};
  Tensor s(std::vector<int64_t>{});
  s.data = {0.5f};
  moe::save_safetensors(dir.file("x.safetensors"), {{"a", &a}, {"s", &s}}, {{"k", "v"}});

  std::string header = R"({"__metadata__":{"k":"v"},)"
                       R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                       R"("s":{"dtype":"F32","shape":[],"data_offsets":[8,12]}})";
  while (header.size() % 8 != 0) header += ' ';
  const std::vector<uint8_t> data = {0x00, 0x00, 0x80, 0x3f,   // 1.0f
                                     0x00, 0x00, 0x00, 0xc0,   // -2.0f
                                     0x00, 0x00, 0x00, 0x3f};  // 0.5f
  std::vector<uint8_t> want;
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) want.push_back(static_cast<uint8_t>((n >> (8 * i)) & 0xff));
  want.insert(want.end(), header.begin(), header.end());
  want.insert(want.end(), data.begin(), data.end());
  EXPECT_EQ(read_bytes(dir.file("x.safetensors")), want);
  EXPECT_EQ((8 + n) % 8, 0u);
}

TEST(Safetensors, ReadsOtherFloatDtypesAsFloat32) {
  std::vector<uint8_t> data;
  auto put = [&](const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    data.insert(data.end(), b, b + n);
  };
  const double d[2] = {0.1, -3.5};
  put(d, sizeof d);  // [0, 16)
  // F16: 1.0, -2.0, 65504 (max), 2^-24 (smallest subnormal), +inf
  const uint16_t h[5] = {0x3c00, 0xc000, 0x7bff, 0x0001, 0x7c00};
  put(h, sizeof h);  // [16, 26)
  // BF16: 1.0, -0.5 (the top halves of the float32 bits)
  const uint16_t bf[2] = {0x3f80, 0xbf00};
  put(bf, sizeof bf);  // [26, 30)
  const std::string header = R"({"d":{"dtype":"F64","shape":[2],"data_offsets":[0,16]},)"
                             R"("h":{"dtype":"F16","shape":[5],"data_offsets":[16,26]},)"
                             R"("b":{"dtype":"BF16","shape":[2],"data_offsets":[26,30]}})";
  const auto f = parse(st_bytes(header, data));
  ASSERT_EQ(f.tensors.size(), 3u);
  EXPECT_EQ(f.tensors[0].dtype, "F64");
  EXPECT_EQ(f.tensors[0].tensor.data, (std::vector<float>{0.1f, -3.5f}));
  EXPECT_EQ(f.tensors[1].dtype, "F16");
  EXPECT_EQ(f.tensors[1].tensor.data,
            (std::vector<float>{1.0f, -2.0f, 65504.0f, std::ldexp(1.0f, -24),
                                std::numeric_limits<float>::infinity()}));
  EXPECT_EQ(f.tensors[2].dtype, "BF16");
  EXPECT_EQ(f.tensors[2].tensor.data, (std::vector<float>{1.0f, -0.5f}));
}

TEST(Safetensors, AcceptsGapsBetweenTensorsAndEmptyTensorsAnywhere) {
  // Not our writer's layout, but other writers may align tensors; gaps hold no tensor.
  const std::string header = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},)"
                             R"("e":{"dtype":"F32","shape":[0,3],"data_offsets":[6,6]}})";
  const auto f = parse(st_bytes(header, k8Zeros));
  ASSERT_EQ(f.tensors.size(), 2u);
  EXPECT_EQ(f.tensors[1].tensor.shape, (std::vector<int64_t>{0, 3}));
}

// ---- the loader's refusals, one per row of docs/checkpoints.md ---------------------------

TEST(SafetensorsLoad, EveryTruncationOfAValidFileThrows) {
  ScratchDir dir;
  Tensor a = filled({3, 2}, 11), b = filled({4}, 12);
  moe::save_safetensors(dir.file("v.safetensors"), {{"a", &a}, {"b", &b}}, {{"k", "v"}});
  const auto full = read_bytes(dir.file("v.safetensors"));
  ASSERT_NO_THROW(parse(full));
  for (size_t len = 0; len < full.size(); ++len) {
    const std::vector<uint8_t> cut(full.begin(), full.begin() + static_cast<long>(len));
    EXPECT_THROW(moe::parse_safetensors(cut.data(), cut.size()), moe::Error) << "length " << len;
    // And the same through the file reader.
    if (len % 7 == 0) {
      write_bytes(dir.file("cut.safetensors"), cut);
      EXPECT_THROW(moe::load_safetensors(dir.file("cut.safetensors")), moe::Error) << len;
    }
  }
}

TEST(SafetensorsLoad, FileShorterThanEightBytes) {
  const std::vector<uint8_t> b = {1, 0, 0};
  EXPECT_TRUE(throws_error_with([&] { parse(b); }, "too short"));
}

TEST(SafetensorsLoad, MissingFileAndFolderNameTheProblem) {
  ScratchDir dir;
  EXPECT_TRUE(throws_error_with([&] { moe::load_safetensors(dir.file("none")); }, "cannot open"));
  EXPECT_TRUE(
      throws_error_with([&] { moe::load_safetensors(dir.path().string()); }, "not a regular file"));
  EXPECT_TRUE(
      throws_error_with([&] { moe::load_safetensors(dir.file("none")); }, dir.file("none")));
}

TEST(SafetensorsLoad, HeaderLengthPastEndOfFile) {
  auto b = st_bytes("{}      ");
  b[0] = 9;  // claims 9 bytes, has 8
  EXPECT_TRUE(throws_error_with([&] { parse(b); }, "runs past the end of the file"));
}

TEST(SafetensorsLoad, AbsurdHeaderLength) {
  auto b = st_bytes("{}      ");
  for (int i = 0; i < 8; ++i) b[static_cast<size_t>(i)] = 0xff;
  EXPECT_TRUE(throws_error_with([&] { parse(b); }, "exceeds the limit"));
}

TEST(SafetensorsLoad, InvalidJson) {
  EXPECT_TRUE(refuses("{\"a\": ", {}, "not valid JSON"));
  EXPECT_TRUE(refuses("", {}, "not valid JSON"));
  EXPECT_TRUE(refuses(std::string("{}\0\0\0\0\0\0", 8), {}, "not valid JSON"));
}

TEST(SafetensorsLoad, NonUtf8Header) {
  EXPECT_TRUE(refuses("{\"\xff\":1}", {}, "not valid UTF-8"));
  // An overlong encoding of '/' and a lone surrogate are not UTF-8 either.
  EXPECT_TRUE(refuses("{\"\xc0\xaf\":1}", {}, "not valid UTF-8"));
  EXPECT_TRUE(refuses("{\"\xed\xa0\x80\":1}", {}, "not valid UTF-8"));
}

TEST(SafetensorsLoad, DeeplyNestedJson) {
  const std::string deep = "{\"a\":" + std::string(10000, '[') + std::string(10000, ']') + "}";
  EXPECT_TRUE(refuses(deep, {}, "nested deeper than"));
  // Brackets inside strings do not count.
  const std::string in_string = "{\"__metadata__\":{\"x\":\"" + std::string(10000, '[') + "\"}}";
  EXPECT_NO_THROW(parse(st_bytes(in_string)));
}

TEST(SafetensorsLoad, TopLevelNotAnObject) {
  EXPECT_TRUE(refuses("[1,2]", {}, "must be a JSON object"));
}

TEST(SafetensorsLoad, EntryNotAnObject) {
  EXPECT_TRUE(refuses(R"({"w":[1,2]})", {}, "tensor 'w': entry must be a JSON object"));
}

TEST(SafetensorsLoad, MetadataNotStrings) {
  EXPECT_TRUE(refuses(R"({"__metadata__":{"a":1}})", {}, "must be a string"));
  EXPECT_TRUE(refuses(R"({"__metadata__":[]})", {}, "must be an object of strings"));
}

TEST(SafetensorsLoad, UnknownDtype) {
  EXPECT_TRUE(refuses(R"({"w":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})", k8Zeros,
                      "unsupported dtype 'I32'"));
  EXPECT_TRUE(refuses(R"({"w":{"dtype":7,"shape":[2],"data_offsets":[0,8]}})", k8Zeros, "'dtype'"));
  EXPECT_TRUE(refuses(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", k8Zeros, "'dtype'"));
}

TEST(SafetensorsLoad, BadShapes) {
  EXPECT_TRUE(refuses(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", k8Zeros,
                      "not a whole number >= 0"));
  EXPECT_TRUE(refuses(R"({"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", k8Zeros,
                      "not a whole number >= 0"));
  EXPECT_TRUE(
      refuses(R"({"w":{"dtype":"F32","shape":"2","data_offsets":[0,8]}})", k8Zeros, "'shape'"));
  // 2^32 · 2^32 elements overflow 64 bits; 2^62 elements fit but not their bytes.
  EXPECT_TRUE(
      refuses(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",
              k8Zeros, "more elements than fit"));
  EXPECT_TRUE(refuses(R"({"w":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,8]}})",
                      k8Zeros, "needs"));
  EXPECT_TRUE(
      refuses(R"({"w":{"dtype":"F32","shape":[99999999999999999999],"data_offsets":[0,8]}})",
              k8Zeros, "not a whole number"));
}

TEST(SafetensorsLoad, DataOffsetsNotTwoIntegers) {
  for (const char* offs : {"[0]", "[0,4,8]", "[\"0\",8]", "[0,8.5]", "{}", "[-8,0]"}) {
    EXPECT_TRUE(
        refuses(std::string(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":)") + offs + "}}",
                k8Zeros, "'data_offsets' must be two whole numbers"))
        << offs;
  }
  EXPECT_TRUE(refuses(R"({"w":{"dtype":"F32","shape":[2]}})", k8Zeros, "got nothing"));
}

TEST(SafetensorsLoad, EndBeforeBegin) {
  EXPECT_TRUE(refuses(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", k8Zeros,
                      "end before they begin"));
}

TEST(SafetensorsLoad, OffsetsPastTheData) {
  EXPECT_TRUE(refuses(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", k8Zeros,
                      "run past the end of the data section (8 bytes)"));
  EXPECT_TRUE(
      refuses(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551608,0]}})",
              k8Zeros, "'data_offsets'"));
}

TEST(SafetensorsLoad, SizeDoesNotMatchShape) {
  EXPECT_TRUE(refuses(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", k8Zeros,
                      "hold 8 bytes but shape [3] of F32 needs 3 x 4"));
  EXPECT_TRUE(
      refuses(R"({"w":{"dtype":"F64","shape":[2],"data_offsets":[0,8]}})", k8Zeros, "needs 2 x 8"));
}

TEST(SafetensorsLoad, OverlappingRanges) {
  EXPECT_TRUE(refuses(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                      R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                      k8Zeros, "overlap"));
  // The same range twice.
  EXPECT_TRUE(refuses(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                      R"("b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                      k8Zeros, "overlap"));
}

TEST(SafetensorsLoad, DuplicateNames) {
  EXPECT_TRUE(refuses(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                      R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                      k8Zeros, "key 'a' twice"));
  EXPECT_TRUE(refuses(R"({"__metadata__":{"x":"1","x":"2"}})", {}, "key 'x' twice"));
}

TEST(SafetensorsLoad, RandomByteFlipsNeverCrash) {
  // A light, deterministic fuzz: every outcome must be a parse or a moe::Error.
  ScratchDir dir;
  Tensor a = filled({2, 2}, 21), b = filled({3}, 22);
  moe::save_safetensors(dir.file("v.safetensors"), {{"a", &a}, {"b", &b}}, {{"k", "v"}});
  const auto full = read_bytes(dir.file("v.safetensors"));
  std::mt19937 rng(5);
  int parsed = 0, refused = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    auto b2 = full;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int f = 0; f < flips; ++f) b2[rng() % b2.size()] = static_cast<uint8_t>(rng());
    try {
      parse(b2);
      ++parsed;
    } catch (const moe::Error&) {
      ++refused;
    }
  }
  EXPECT_EQ(parsed + refused, 3000);
  EXPECT_GT(refused, 0);
}

// ---- saving --------------------------------------------------------------------------------

TEST(SafetensorsSave, RefusesBadInputWithoutTouchingTheFile) {
  ScratchDir dir;
  const std::string path = dir.file("keep.safetensors");
  Tensor a = filled({2}, 1);
  moe::save_safetensors(path, {{"a", &a}});
  const auto before = read_bytes(path);

  Tensor bad({2, 2});
  bad.data.resize(3);
  EXPECT_TRUE(throws_error_with(
      [&] {
        moe::save_safetensors(path, {{"bad", &bad}});
      },
      "holds 3 values"));
  EXPECT_TRUE(throws_error_with(
      [&] {
        moe::save_safetensors(path, {{"a", &a}, {"a", &a}});
      },
      "given twice"));
  EXPECT_TRUE(throws_error_with([&] { moe::save_safetensors(path, {{"n", nullptr}}); }, "is null"));
  EXPECT_TRUE(throws_error_with(
      [&] {
        moe::save_safetensors(path, {{"__metadata__", &a}});
      },
      "reserved"));
  EXPECT_TRUE(throws_error_with([&] { moe::save_safetensors(path, {{"\xff", &a}}); }, "UTF-8"));
  EXPECT_TRUE(throws_error_with(
      [&] {
        moe::save_safetensors(path, {}, {{"k", "\xc3"}});
      },
      "UTF-8"));
  Tensor neg;
  neg.shape = {-1};
  EXPECT_TRUE(throws_error_with([&] { moe::save_safetensors(path, {{"neg", &neg}}); }, "negative"));
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(dir.listing(), std::vector<std::string>{"keep.safetensors"});
}

TEST(SafetensorsSave, MissingFolderThrowsAndLeavesNothing) {
  ScratchDir dir;
  Tensor a = filled({2}, 1);
  EXPECT_TRUE(throws_error_with(
      [&] {
        moe::save_safetensors(dir.file("no/such/dir/x.safetensors"), {{"a", &a}});
      },
      "no/such/dir/x.safetensors"));
  EXPECT_TRUE(dir.listing().empty());
}

TEST(SafetensorsSave, FailedRenameRemovesTheTemporary) {
  // The target is a non-empty folder: the temporary is written in full, then rename fails.
  ScratchDir dir;
  const std::string target = dir.file("target");
  std::filesystem::create_directory(target);
  write_bytes(target + "/inside", {1, 2, 3});
  Tensor a = filled({16}, 1);
  EXPECT_TRUE(throws_error_with([&] { moe::save_safetensors(target, {{"a", &a}}); }, "renaming"));
  EXPECT_EQ(dir.listing(), std::vector<std::string>{"target"});
  EXPECT_EQ(read_bytes(target + "/inside"), (std::vector<uint8_t>{1, 2, 3}));
}

TEST(SafetensorsSave, WriteFailingHalfwayLeavesTheOldFileIntact) {
  // RLIMIT_FSIZE makes write() fail with EFBIG part-way through the new file: a real
  // mid-write failure. The old, smaller file must survive byte for byte.
  ScratchDir dir;
  const std::string path = dir.file("ckpt.safetensors");
  Tensor small = filled({4}, 1);
  moe::save_safetensors(path, {{"w", &small}});
  const auto before = read_bytes(path);

  Tensor big = filled({64 * 1024}, 2);  // 256 KiB of data
  struct rlimit old_lim {};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old_lim), 0);
  struct rlimit lim = old_lim;
  lim.rlim_cur = 64 * 1024;
  auto old_handler = signal(SIGXFSZ, SIG_IGN);
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &lim), 0);
  bool threw = false;
  std::string msg;
  try {
    moe::save_safetensors(path, {{"w", &big}});
  } catch (const moe::Error& e) {
    threw = true;
    msg = e.what();
  }
  setrlimit(RLIMIT_FSIZE, &old_lim);
  signal(SIGXFSZ, old_handler);

  EXPECT_TRUE(threw);
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(dir.listing(), std::vector<std::string>{"ckpt.safetensors"});
  // And a save that succeeds afterwards replaces it.
  moe::save_safetensors(path, {{"w", &big}});
  expect_same_bits(moe::load_safetensors(path).tensors.at(0).tensor, big);
}

// ---- interoperability (driven by tests/python/test_safetensors_format.py) ------------------

TEST(SafetensorsInterop, CopyFileGivenByEnvironment) {
  // The Python test writes a file with numpy, has this test read it and write it back with
  // our writer, then parses our output with json + numpy: both directions against an
  // independent implementation. Without the variables it has nothing to do.
  const char* in = std::getenv("MOE_SAFETENSORS_COPY_IN");
  const char* out = std::getenv("MOE_SAFETENSORS_COPY_OUT");
  if (!in || !out) GTEST_SKIP() << "run by tests/python/test_safetensors_format.py";
  const auto f = moe::load_safetensors(in);
  std::vector<std::pair<std::string, const Tensor*>> named;
  for (const auto& t : f.tensors) named.emplace_back(t.name, &t.tensor);
  moe::save_safetensors(out, named, f.metadata);
}
