#pragma once
// Constrained decoding: which tokens a grammar (a JSON schema, a regex, a Lark grammar) allows
// next, through llguidance's C API.
//
// llguidance is a Python wheel with no dependencies of its own; its extension module also exports
// the C API (llg_*). We load that module at run time (dlopen, path from Python) and call it from
// the engine thread without the GIL, so pyserve builds without it and pays nothing for it until a
// request asks for structured output.
//
//   GrammarVocabulary  the model's tokens as bytes (special ones marked), shared by every grammar
//   CompiledGrammar    a grammar checked and compiled once (Python caches them per schema);
//                      immutable: each choice of each request starts its own matcher from it
//   GrammarMatcher     one sequence's position in its grammar: the allowed-token mask, consume,
//                      the drafts it would accept, accepting / stopped
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace pyserve {

struct GrammarLibrary;  // the dlopen'ed llguidance functions (grammar.cpp)

class GrammarVocabulary {
 public:
  // library_path: llguidance's extension module. tokens: each id's bytes, special tokens prefixed
  // with 0xFF (llguidance's marker: the grammar never produces them as text). eos: the token the
  // grammar allows where it may end; every id in also_eos is treated the same way.
  // Throws std::runtime_error (library missing, vocabulary refused).
  GrammarVocabulary(const std::string& library_path, const std::vector<std::string>& tokens, int32_t eos,
                    std::vector<int32_t> also_eos);
  ~GrammarVocabulary();
  GrammarVocabulary(const GrammarVocabulary&) = delete;
  GrammarVocabulary& operator=(const GrammarVocabulary&) = delete;

  int vocab_size() const { return vocab_size_; }
  int mask_words() const { return (vocab_size_ + 31) / 32; }
  int32_t eos() const { return eos_; }
  const std::vector<int32_t>& also_eos() const { return also_eos_; }

 private:
  friend class CompiledGrammar;
  friend class GrammarMatcher;
  std::shared_ptr<const GrammarLibrary> lib_;
  void* tokenizer_ = nullptr;  // LlgTokenizer*
  int vocab_size_ = 0;
  int32_t eos_ = 0;
  std::vector<int32_t> also_eos_;
};

class GrammarMatcher;

class CompiledGrammar {
 public:
  // kind: "json_schema" | "regex" | "lark" | "llguidance" (llguidance's own JSON form). Throws
  // std::invalid_argument with llguidance's reason when the grammar does not compile.
  CompiledGrammar(std::shared_ptr<const GrammarVocabulary> vocab, const std::string& kind, const std::string& data);
  ~CompiledGrammar();
  CompiledGrammar(const CompiledGrammar&) = delete;
  CompiledGrammar& operator=(const CompiledGrammar&) = delete;

  // A matcher at the grammar's start. Thread-safe (the compiled state is only read).
  std::unique_ptr<GrammarMatcher> start() const;
  const GrammarVocabulary& vocabulary() const { return *vocab_; }

 private:
  std::shared_ptr<const GrammarVocabulary> vocab_;
  void* initial_ = nullptr;  // LlgMatcher*, never advanced
};

class GrammarMatcher {
 public:
  class Key {  // only CompiledGrammar makes matchers
    Key() = default;
    friend class CompiledGrammar;
  };
  GrammarMatcher(Key, std::shared_ptr<const GrammarVocabulary> vocab, void* matcher);
  ~GrammarMatcher();
  GrammarMatcher(const GrammarMatcher&) = delete;
  GrammarMatcher& operator=(const GrammarMatcher&) = delete;

  // mask: [mask_words] bits, bit t of word t / 32 set when token t may come next. Every also_eos
  // id gets the EOS bit. Returns false when nothing but EOS may come (the grammar is complete).
  // Throws std::runtime_error when the matcher is in an error state.
  bool fill_mask(uint32_t* mask);
  // Advances by one token (an also_eos id counts as EOS). False when the grammar rejects it (the
  // matcher is then in an error state; error() says why).
  bool consume(int32_t token);
  // How many of tokens, in order, the grammar would accept from here (nothing is consumed).
  int valid_prefix(const int32_t* tokens, int n);
  bool accepting();       // the text so far is a complete match
  bool stopped() const;   // nothing but EOS may follow (or the matcher failed)
  std::string error();    // empty when fine
  const GrammarVocabulary& vocabulary() const { return *vocab_; }

 private:
  uint32_t map_eos(int32_t token) const;
  std::shared_ptr<const GrammarVocabulary> vocab_;
  void* matcher_ = nullptr;  // LlgMatcher*
};

}  // namespace pyserve
