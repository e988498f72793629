#include "engine/grammar.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <unordered_map>

namespace pyserve {

namespace {

// The C layouts of llguidance's API (its src/ffi.rs) that we fill in. Both structs are
// zero-initialised: fields the library added after these read as zero, its documented default.
using TokenizeFn = size_t (*)(const void*, const uint8_t*, size_t, uint32_t*, size_t);
struct TokenizerInit {
  uint32_t vocab_size;
  uint32_t tok_eos;
  const uint32_t* token_lens;
  const uint8_t* token_bytes;
  const char* tokenizer_json;
  bool tokenize_assumes_string;
  TokenizeFn tokenize_fn;
  bool use_approximate_greedy_tokenize_fn;
  const void* tokenize_user_data;
  const char* const* slices;  // null: llguidance's default slicer partitions
};
// The head of LlgConstraintInit; its parser limits follow and are filled in by the library's
// llg_constraint_init_set_defaults, so the whole struct lives in a buffer larger than any version.
struct ConstraintInitHead {
  const void* tokenizer;
  uint32_t log_buffer_level;
  uint32_t log_stderr_level;
  bool ff_tokens_ok;
  bool backtrack_ok;
};
union ConstraintInit {
  ConstraintInitHead head;
  alignas(8) unsigned char bytes[1024];
};
static_assert(offsetof(ConstraintInitHead, log_stderr_level) == 12, "LlgConstraintInit layout");
static_assert(offsetof(TokenizerInit, token_lens) == 8 && sizeof(TokenizerInit) == 72, "LlgTokenizerInit layout");

}  // namespace

struct GrammarLibrary {
  void* handle = nullptr;
  void* (*new_tokenizer)(const TokenizerInit*, char*, size_t) = nullptr;
  void (*free_tokenizer)(void*) = nullptr;
  void (*constraint_init_set_defaults)(ConstraintInit*, const void*) = nullptr;
  void* (*new_matcher)(const ConstraintInit*, const char*, const char*) = nullptr;
  void* (*clone_matcher)(const void*) = nullptr;
  void (*free_matcher)(void*) = nullptr;
  const char* (*matcher_get_error)(void*) = nullptr;
  bool (*matcher_is_error)(const void*) = nullptr;
  int32_t (*matcher_compute_mask_into)(void*, uint32_t*, size_t) = nullptr;
  size_t (*matcher_get_mask_byte_size)(const void*) = nullptr;
  int32_t (*matcher_consume_token)(void*, uint32_t) = nullptr;
  int32_t (*matcher_validate_tokens)(void*, const uint32_t*, size_t) = nullptr;
  bool (*matcher_is_accepting)(void*) = nullptr;
  bool (*matcher_is_stopped)(const void*) = nullptr;

  // One instance per library path, for the life of the process (the module stays loaded anyway:
  // Python holds it once imported).
  static std::shared_ptr<const GrammarLibrary> open(const std::string& path) {
    static std::mutex mu;
    static std::unordered_map<std::string, std::shared_ptr<const GrammarLibrary>> opened;
    std::lock_guard<std::mutex> lock(mu);
    auto it = opened.find(path);
    if (it != opened.end()) return it->second;
    auto lib = std::make_shared<GrammarLibrary>();
    lib->handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib->handle) {
      const char* why = dlerror();
      throw std::runtime_error("cannot load llguidance from " + path + ": " + (why ? why : "unknown error"));
    }
    lib->bind(lib->new_tokenizer, "llg_new_tokenizer");
    lib->bind(lib->free_tokenizer, "llg_free_tokenizer");
    lib->bind(lib->constraint_init_set_defaults, "llg_constraint_init_set_defaults");
    lib->bind(lib->new_matcher, "llg_new_matcher");
    lib->bind(lib->clone_matcher, "llg_clone_matcher");
    lib->bind(lib->free_matcher, "llg_free_matcher");
    lib->bind(lib->matcher_get_error, "llg_matcher_get_error");
    lib->bind(lib->matcher_is_error, "llg_matcher_is_error");
    lib->bind(lib->matcher_compute_mask_into, "llg_matcher_compute_mask_into");
    lib->bind(lib->matcher_get_mask_byte_size, "llg_matcher_get_mask_byte_size");
    lib->bind(lib->matcher_consume_token, "llg_matcher_consume_token");
    lib->bind(lib->matcher_validate_tokens, "llg_matcher_validate_tokens");
    lib->bind(lib->matcher_is_accepting, "llg_matcher_is_accepting");
    lib->bind(lib->matcher_is_stopped, "llg_matcher_is_stopped");
    opened[path] = lib;
    return lib;
  }

 private:
  template <typename F>
  void bind(F& fn, const char* name) {
    void* sym = dlsym(handle, name);
    if (!sym) throw std::runtime_error(std::string("llguidance lacks ") + name + " (version too old?)");
    fn = reinterpret_cast<F>(sym);
  }
};

GrammarVocabulary::GrammarVocabulary(const std::string& library_path, const std::vector<std::string>& tokens,
                                     int32_t eos, std::vector<int32_t> also_eos)
    : lib_(GrammarLibrary::open(library_path)),
      vocab_size_(static_cast<int>(tokens.size())),
      eos_(eos),
      also_eos_(std::move(also_eos)) {
  if (eos < 0 || eos >= vocab_size_) throw std::invalid_argument("grammar vocabulary: EOS id outside the vocabulary");
  also_eos_.erase(std::remove_if(also_eos_.begin(), also_eos_.end(),
                                 [&](int32_t t) { return t == eos || t < 0 || t >= vocab_size_; }),
                  also_eos_.end());
  std::vector<uint32_t> lens;
  std::string bytes;
  lens.reserve(tokens.size());
  for (const std::string& t : tokens) {
    lens.push_back(static_cast<uint32_t>(t.size()));
    bytes += t;
  }
  TokenizerInit init{};
  init.vocab_size = static_cast<uint32_t>(vocab_size_);
  init.tok_eos = static_cast<uint32_t>(eos);
  init.token_lens = lens.data();
  init.token_bytes = reinterpret_cast<const uint8_t*>(bytes.data());
  // Grammars here never turn text into tokens (no forced strings are tokenized): greedy will do.
  init.use_approximate_greedy_tokenize_fn = true;
  char error[1024] = {0};
  tokenizer_ = lib_->new_tokenizer(&init, error, sizeof(error));
  if (!tokenizer_) throw std::runtime_error(std::string("llguidance refused the vocabulary: ") + error);
}

GrammarVocabulary::~GrammarVocabulary() {
  if (tokenizer_) lib_->free_tokenizer(tokenizer_);
}

CompiledGrammar::CompiledGrammar(std::shared_ptr<const GrammarVocabulary> vocab, const std::string& kind,
                                 const std::string& data)
    : vocab_(std::move(vocab)) {
  static const char* const kinds[] = {"json_schema", "regex", "lark", "llguidance"};
  if (std::none_of(std::begin(kinds), std::end(kinds), [&](const char* k) { return kind == k; }))
    throw std::invalid_argument("unknown grammar kind '" + kind + "' (json_schema, regex, lark, llguidance)");
  const GrammarLibrary& lib = *vocab_->lib_;
  ConstraintInit init;
  std::memset(&init, 0, sizeof(init));
  lib.constraint_init_set_defaults(&init, vocab_->tokenizer_);
  init.head.log_stderr_level = 0;  // errors come back as exceptions, not as stderr noise
  init.head.log_buffer_level = 0;
  initial_ = lib.new_matcher(&init, kind.c_str(), data.c_str());
  if (!initial_) throw std::runtime_error("llguidance returned no matcher");
  if (lib.matcher_is_error(initial_)) {
    const char* why = lib.matcher_get_error(initial_);
    std::string message = why ? why : "the grammar does not compile";
    lib.free_matcher(initial_);
    initial_ = nullptr;
    throw std::invalid_argument(message);
  }
  const size_t expect = static_cast<size_t>(vocab_->mask_words()) * 4;
  if (lib.matcher_get_mask_byte_size(initial_) != expect) {
    lib.free_matcher(initial_);
    initial_ = nullptr;
    throw std::runtime_error("llguidance's mask size does not match the vocabulary");
  }
}

CompiledGrammar::~CompiledGrammar() {
  if (initial_) vocab_->lib_->free_matcher(initial_);
}

std::unique_ptr<GrammarMatcher> CompiledGrammar::start() const {
  void* m = vocab_->lib_->clone_matcher(initial_);
  if (!m) throw std::runtime_error("llguidance could not copy a matcher");
  return std::make_unique<GrammarMatcher>(GrammarMatcher::Key(), vocab_, m);
}

GrammarMatcher::GrammarMatcher(Key, std::shared_ptr<const GrammarVocabulary> vocab, void* matcher)
    : vocab_(std::move(vocab)), matcher_(matcher) {}

GrammarMatcher::~GrammarMatcher() {
  if (matcher_) vocab_->lib_->free_matcher(matcher_);
}

uint32_t GrammarMatcher::map_eos(int32_t token) const {
  const auto& also = vocab_->also_eos_;
  return std::find(also.begin(), also.end(), token) != also.end() ? static_cast<uint32_t>(vocab_->eos_)
                                                                   : static_cast<uint32_t>(token);
}

bool GrammarMatcher::fill_mask(uint32_t* mask) {
  const GrammarLibrary& lib = *vocab_->lib_;
  if (lib.matcher_compute_mask_into(matcher_, mask, static_cast<size_t>(vocab_->mask_words()) * 4) != 0)
    throw std::runtime_error("grammar: " + error());
  const int32_t eos = vocab_->eos_;
  const bool eos_ok = (mask[eos >> 5] >> (eos & 31)) & 1u;
  for (int32_t t : vocab_->also_eos_) {
    if (eos_ok) mask[t >> 5] |= 1u << (t & 31);
    else mask[t >> 5] &= ~(1u << (t & 31));
  }
  if (!eos_ok) return true;
  // Anything allowed besides the EOS ids?
  const int words = vocab_->mask_words();
  for (int w = 0; w < words; ++w) {
    uint32_t bits = mask[w];
    if (!bits) continue;
    if ((eos >> 5) == w) bits &= ~(1u << (eos & 31));
    for (int32_t t : vocab_->also_eos_)
      if ((t >> 5) == w) bits &= ~(1u << (t & 31));
    if (bits) return true;
  }
  return false;
}

bool GrammarMatcher::consume(int32_t token) {
  if (token < 0 || token >= vocab_->vocab_size_) return false;
  return vocab_->lib_->matcher_consume_token(matcher_, map_eos(token)) == 0;
}

int GrammarMatcher::valid_prefix(const int32_t* tokens, int n) {
  std::vector<uint32_t> ids(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab_->vocab_size_) return i;
    ids[static_cast<size_t>(i)] = map_eos(tokens[i]);
  }
  const int32_t ok = vocab_->lib_->matcher_validate_tokens(matcher_, ids.data(), ids.size());
  return ok < 0 ? 0 : std::min(ok, n);
}

bool GrammarMatcher::accepting() { return vocab_->lib_->matcher_is_accepting(matcher_); }

bool GrammarMatcher::stopped() const { return vocab_->lib_->matcher_is_stopped(matcher_); }

std::string GrammarMatcher::error() {
  const GrammarLibrary& lib = *vocab_->lib_;
  if (!lib.matcher_is_error(matcher_)) return {};
  const char* why = lib.matcher_get_error(matcher_);
  return why ? why : "unknown grammar error";
}

}  // namespace pyserve
